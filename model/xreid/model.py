"""X-ReID (Yu et al., AAAI-26): CLIP ViT + camera embedding + CPC features + MII (SII, LII, CII).

The first complete X-ReID: the official release uses SII only; LII, the SII/LII fusion (Eq. 8),
CII and the CMCL inputs (Eq. 9) are built here from the paper. Each open choice is an option of
:class:`XReID` with the official code's value as default where the code has one.

Shape letters: B clips, T frames, L = 1 + N tokens per frame, D backbone width (768 for
ViT-B/16), P projection width (512), C training identities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from vvireid.model.base import UNKNOWN_CAMERA, ReIDModel, check_camids
from vvireid.model.config import ModelConfig
from vvireid.model.heads import BNClassifier
from vvireid.model.xreid.interaction import (
    CrossModalityInteraction,
    LongTermInteraction,
    ShortTermInteraction,
)

log = logging.getLogger(__name__)

CPC_POOLS = ("both", "other")
CII_GUARDS = ("stopgrad", "supervise", "none")


@dataclass(frozen=True)
class CIIOutput:
    """One MII branch after cross-modality interaction (training only).

    Fields (pre-BN): ``branch`` ("sii" or "lii"); ``branch_mean`` Ō of the branch [B, D];
    ``interacted`` O_CII [B, D]; ``logits`` the CII identity logits [B, C], or None when the
    guard is "none" (no CII head).
    """

    branch: str
    branch_mean: torch.Tensor
    interacted: torch.Tensor
    logits: torch.Tensor | None


@dataclass(frozen=True)
class XReIDOutput:
    """Training outputs of :class:`XReID`, by name.

    - ``logits_clip`` [B, C]: classifier on [BN f̄ ; BN p̄];
      ``logits_clip_frame`` [B*T, C]: the same per frame (clip-major rows).
    - ``logits_mii`` [B, C] / ``logits_mii_frame`` [B*T, C]: MII head on ō / o_t (None without
      SII and LII).
    - ``f_mean`` [B, D], ``p_mean`` [B, P], ``o_mean`` [B, D] (or None): pre-BN, for triplets.
    - ``memory_feat`` [B, D+P]: [BN f̄ ; BN p̄], the CPCL input.
    - ``cii``: one :class:`CIIOutput` per MII branch when training with CII, else ().
    """

    logits_clip: torch.Tensor
    logits_clip_frame: torch.Tensor
    f_mean: torch.Tensor
    p_mean: torch.Tensor
    memory_feat: torch.Tensor
    logits_mii: torch.Tensor | None = None
    logits_mii_frame: torch.Tensor | None = None
    o_mean: torch.Tensor | None = None
    cii: tuple[CIIOutput, ...] = ()


def _bn_neck(dim: int) -> nn.BatchNorm1d:
    """BatchNorm1d with weight 1 and its bias frozen at 0 (X-ReID's BNNeck)."""
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


class XReID(ReIDModel):
    """X-ReID: multi-granularity information interaction for video VI-ReID.

    Retrieval feature (``encode``): ``normalize([BN f̄ ; BN p̄ ; BN ō])``, 2048-d for ViT-B/16,
    where f̄/p̄ are the temporal means of the frame [CLS] (D) and its projection (P), and ō the
    temporal mean of the fused MII output ``o_t = (o_t^SII + o_t^LII) / 2``. Without SII and LII
    the feature is ``normalize([BN f̄ ; BN p̄])``. CII is never used at inference.

    Camera ids (``camids``) are training camera indices in [0, num_cameras); -1 or ``None``
    means an unknown camera (e.g. a gallery from other cameras) and uses the mean camera
    embedding. Any other value is an error rather than a silently wrong embedding.

    Options (``OPTIONS``): ``use_cpc`` (prototype memories, used by the objective), ``use_sii``,
    ``use_lii``, ``use_cii``, ``lii_stride`` (S, cyclic), ``sii_depth`` (stacked SII blocks),
    ``camera_embedding`` and ``sie_coe`` (a learned per-camera vector added to every frame's
    [CLS]), ``cpc_momentum``, ``cpc_pool`` ("both": every same-id clip, as the code; "other":
    the other modality's clips, as paper Eq. 2), ``cpc_temperature``, ``cmcl_squared`` and
    ``cii_collapse_guard``:

    - "stopgrad" (default): CII reads a detached Ō and is trained by identity + triplet losses on
      O_CII; CMCL pulls Ō toward a detached O_CII. CMCL therefore cannot reach CII's weights, so
      CII cannot zero its residual to make CMCL vanish.
    - "supervise": full gradient through CII in CMCL, plus identity + triplet losses on O_CII
      (a second reading of the paper; weaker: CMCL still pushes CII's residual toward 0).
    - "none": the paper read literally, CII trained by CMCL only (collapses; for ablations).
    """

    method: ClassVar[str] = "xreid"
    similarity: ClassVar[str] = "cosine"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "use_cpc": True,
        "use_sii": True,
        "use_lii": True,
        "use_cii": True,
        "lii_stride": 2,
        "sii_depth": 2,
        "camera_embedding": True,
        "sie_coe": 1.0,
        "cpc_momentum": 0.1,
        "cpc_pool": "both",
        "cpc_temperature": 0.05,
        "cmcl_squared": False,
        "cii_collapse_guard": "stopgrad",
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.opts = self.resolve_options(config.options)
        _validate_options(self.opts)
        width, proj, classes = self.backbone.width, self.backbone.proj_dim, config.num_classes
        self._freeze_patch_embed()
        self._build_camera_embedding(config.num_cameras, width)
        self.head_clip = BNClassifier(width + proj, classes, freeze_bn_bias=True)
        self.head_clip_frame = BNClassifier(width + proj, classes, freeze_bn_bias=True)
        self.sii = (
            ShortTermInteraction(width, self.opts["sii_depth"]) if self.opts["use_sii"] else None
        )
        self.lii = (
            LongTermInteraction(width, self.opts["lii_stride"]) if self.opts["use_lii"] else None
        )
        self.head_mii = BNClassifier(width, classes, freeze_bn_bias=True) if self.has_mii else None
        self.bn_mii_frame = _bn_neck(width) if self.has_mii else None
        self.cii = CrossModalityInteraction(width) if self.opts["use_cii"] else None
        supervised = self.cii is not None and self.opts["cii_collapse_guard"] != "none"
        self.head_cii = BNClassifier(width, classes, freeze_bn_bias=True) if supervised else None

    # ---- construction ------------------------------------------------------------------------
    def _freeze_patch_embed(self) -> None:
        """Freeze the patch projection ``conv1`` ("for stability", as the official code).

        A convolutional stem (``vvireid-demo``, random init) stays trainable: freezing it would
        freeze random features, not pretrained ones.
        """
        if not isinstance(self.backbone.visual.conv1, nn.Conv2d):
            return
        for param in self.backbone.visual.conv1.parameters():
            param.requires_grad_(False)

    def _build_camera_embedding(self, num_cameras: int, width: int) -> None:
        self.sie_coe = float(self.opts["sie_coe"])
        if not self.opts["camera_embedding"] or num_cameras < 1:
            if self.opts["camera_embedding"]:
                log.warning(
                    "xreid: num_cameras=0, so no camera embedding is built (camids ignored)"
                )
            self.register_parameter("cv_embed", None)
            return
        self.cv_embed = nn.Parameter(torch.empty(num_cameras, width))
        nn.init.trunc_normal_(self.cv_embed, std=0.02)

    @property
    def has_mii(self) -> bool:
        return self.sii is not None or self.lii is not None

    @property
    def memory_dim(self) -> int:
        """Width of the CPC memory feature [BN f̄ ; BN p̄] (1280 for ViT-B/16)."""
        return self.backbone.width + self.backbone.proj_dim

    @property
    def embed_dim(self) -> int:
        return self.memory_dim + (self.backbone.width if self.has_mii else 0)

    @property
    def feature_variants(self) -> dict[str, tuple[slice, ...]]:
        """The official test outputs: ``[BN f̄; BN p̄; BN ō]``, ``BN f̄``, ``[BN f̄; BN ō]``, ``BN ō``."""
        width, memory = self.backbone.width, self.memory_dim
        variants = {"f_p_o": (slice(0, self.embed_dim),), "f": (slice(0, width),)}
        if self.has_mii:
            variants["f_o"] = (slice(0, width), slice(memory, memory + width))
            variants["o"] = (slice(memory, memory + width),)
        return variants

    # ---- shared pieces ------------------------------------------------------------------------
    def _camera_bias(
        self, camids: torch.Tensor | None, batch: int, frames: int
    ) -> torch.Tensor | None:
        """Per-frame [CLS] bias ``sie_coe * cv_embed[camid]``, repeated over each clip's frames.

        A camid of -1 (or ``camids=None``) means an unknown camera and gets the mean of the
        camera embeddings: every training input carried some camera's embedding, and the mean is
        the input closest to that distribution in expectation, whereas a zero vector would shift
        every [CLS] by minus the mean embedding, an input the network never saw in training.
        """
        if self.cv_embed is None:
            return None
        num_cameras = self.cv_embed.shape[0]
        if camids is None:
            camids = torch.full((batch,), UNKNOWN_CAMERA, dtype=torch.long)
        camids = torch.as_tensor(camids).to(self.cv_embed.device)
        if camids.shape != (batch,) or camids.dtype.is_floating_point or camids.dtype == torch.bool:
            raise ValueError(
                f"camids must be [{batch}] integers, got {camids.dtype} {tuple(camids.shape)}"
            )
        if camids.numel():
            check_camids(camids, num_cameras)
        known = (camids >= 0).unsqueeze(1)
        embedding = torch.where(
            known, self.cv_embed[camids.clamp(min=0)], self.cv_embed.mean(dim=0, keepdim=True)
        )
        return (self.sie_coe * embedding).repeat_interleave(frames, dim=0)

    def _frame_tokens(self, clips: torch.Tensor, cls_bias: torch.Tensor | None) -> torch.Tensor:
        """Backbone tokens after ``ln_post``. Shape: [B, T, 3, H, W] -> [B, T, L, D]."""
        batch, frames = clips.shape[:2]
        tokens = self.backbone(clips.flatten(0, 1), cls_bias)
        return tokens.view(batch, frames, *tokens.shape[1:])

    def _global_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame [CLS] and its projection. Shape: [B, T, L, D] -> ([B, T, D], [B, T, P])."""
        cls = tokens[:, :, 0]
        return cls, cls @ self.backbone.proj

    def _mii_branches(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """SII and LII outputs per frame, on detached tokens.

        Shape: [B, T, L, D] -> {"sii"|"lii": [B, T, D]}.
        """
        tokens = tokens.detach()
        cls, patches = tokens[:, :, 0], tokens[:, :, 1:]
        branches = {}
        if self.sii is not None:
            branches["sii"] = self.sii(cls, patches)
        if self.lii is not None:
            branches["lii"] = self.lii(cls, patches)
        return branches

    @staticmethod
    def _fuse(branches: dict[str, torch.Tensor]) -> torch.Tensor:
        """Paper Eq. 8: per-frame mean of the SII and LII outputs (or the one present)."""
        return torch.stack(list(branches.values())).mean(dim=0)

    # ---- public API ----------------------------------------------------------------------------
    def forward(
        self,
        clips: torch.Tensor,
        camids: torch.Tensor | None = None,
        pairs: torch.Tensor | None = None,
    ) -> XReIDOutput:
        """Training outputs (see :class:`XReIDOutput`).

        ``pairs[i]`` is the index of clip i's other-modality partner for CII (used only when
        training with CII). Default: the ``TrainBatch`` layout, visible clips then infrared
        clips, index-aligned, so clip i pairs with clip (i + B/2) mod B.

        Shape: clips [B, T, 3, H, W], camids [B] or None, pairs [B] or None.
        """
        self.check_clips(clips)
        batch, frames = clips.shape[:2]
        tokens = self._frame_tokens(clips, self._camera_bias(camids, batch, frames))
        cls, proj = self._global_features(tokens)
        f_mean, p_mean = cls.mean(dim=1), proj.mean(dim=1)
        memory_feat, logits_clip = self.head_clip(torch.cat([f_mean, p_mean], dim=1))
        _, logits_clip_frame = self.head_clip_frame(torch.cat([cls, proj], dim=2).flatten(0, 1))
        outputs: dict[str, Any] = {
            "logits_clip": logits_clip,
            "logits_clip_frame": logits_clip_frame,
            "f_mean": f_mean,
            "p_mean": p_mean,
            "memory_feat": memory_feat,
        }
        if self.has_mii:
            branches = self._mii_branches(tokens)
            outputs.update(self._mii_outputs(self._fuse(branches)))
            if self.training and self.cii is not None:
                outputs["cii"] = self._cross_modality(branches, tokens.detach()[:, :, 1:], pairs)
        return XReIDOutput(**outputs)

    def _mii_outputs(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.head_mii is not None and self.bn_mii_frame is not None
        o_mean = fused.mean(dim=1)
        _, logits_mii = self.head_mii(o_mean)
        # The official code classifies frames with the clip-level MII classifier after a
        # frame-level BN (``classifier_TSM_tp0`` on ``bn_TSM_frame0``).
        logits_mii_frame = self.head_mii.fc(self.bn_mii_frame(fused.flatten(0, 1)))
        return {"o_mean": o_mean, "logits_mii": logits_mii, "logits_mii_frame": logits_mii_frame}

    def _cross_modality(
        self, branches: dict[str, torch.Tensor], patches: torch.Tensor, pairs: torch.Tensor | None
    ) -> tuple[CIIOutput, ...]:
        assert self.cii is not None
        partner = self._partners(patches.shape[0], pairs, patches.device)
        detach_query = self.opts["cii_collapse_guard"] == "stopgrad"
        results = []
        for name, frames_out in branches.items():
            branch_mean = frames_out.mean(dim=1)
            query = branch_mean.detach() if detach_query else branch_mean
            interacted = self.cii(query, patches, partner)
            logits = self.head_cii(interacted)[1] if self.head_cii is not None else None
            results.append(CIIOutput(name, branch_mean, interacted, logits))
        return tuple(results)

    @staticmethod
    def _partners(batch: int, pairs: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if pairs is None:
            if batch % 2:
                raise ValueError(
                    f"CII pairs visible clip i with infrared clip i + B/2, but the batch has an "
                    f"odd number of clips ({batch}); pass pairs= or use_cii=False"
                )
            return (torch.arange(batch, device=device) + batch // 2) % batch
        pairs = torch.as_tensor(pairs, device=device)
        if pairs.shape != (batch,) or pairs.dtype.is_floating_point:
            raise ValueError(f"pairs must be [{batch}] clip indices, got {tuple(pairs.shape)}")
        if batch and (int(pairs.min()) < 0 or int(pairs.max()) >= batch):
            raise ValueError(f"pairs must index clips in [0, {batch}), got {pairs.tolist()}")
        return pairs.long()

    def _encode(self, clips: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        batch, frames = clips.shape[:2]
        tokens = self._frame_tokens(clips, self._camera_bias(camids, batch, frames))
        cls, proj = self._global_features(tokens)
        parts = [self.head_clip.bn(torch.cat([cls.mean(dim=1), proj.mean(dim=1)], dim=1))]
        if self.has_mii:
            assert self.head_mii is not None
            parts.append(self.head_mii.bn(self._fuse(self._mii_branches(tokens)).mean(dim=1)))
        return torch.cat(parts, dim=1)  # encode() L2-normalises (similarity "cosine")

    def memory_features(self, clips: torch.Tensor) -> torch.Tensor:
        """CPC memory feature ``[BN f̄ ; BN p̄]`` without camera embedding (official ``get_image``).

        Runs in the model's current mode; the objective calls it in eval mode under no_grad.
        Shape: clips [B, T, 3, H, W] -> [B, D+P].
        """
        self.check_clips(clips)
        cls, proj = self._global_features(self._frame_tokens(clips, None))
        return self.head_clip.bn(torch.cat([cls.mean(dim=1), proj.mean(dim=1)], dim=1))

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Adam groups per the official rules, applied in order (docs/fidelity.md X17).

        ``base_lr`` for everything; x2 for biases; x10 for identity classifiers; x10 for the MII
        modules (SII, LII, CII, their BN necks and classifiers). MII classifiers therefore get
        x100 and MII biases x20. Coupled L2 ``weight_decay`` on every group, biases and BN
        weights included. Frozen parameters (``conv1``, BN biases) are left out.
        """
        heads = (self.head_clip, self.head_clip_frame, self.head_mii, self.head_cii)
        classifiers = [head.fc for head in heads if head is not None]
        mii_parts = (self.sii, self.lii, self.cii, self.head_mii, self.bn_mii_frame, self.head_cii)
        mii = [module for module in mii_parts if module is not None]
        classifier_ids = {id(p) for module in classifiers for p in module.parameters()}
        mii_ids = {id(p) for module in mii for p in module.parameters()}
        by_mult: dict[float, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            mult = 2.0 if name.endswith("bias") else 1.0
            mult *= 10.0 if id(param) in classifier_ids else 1.0
            mult *= 10.0 if id(param) in mii_ids else 1.0
            by_mult.setdefault(mult, []).append(param)
        return [
            {"params": params, "lr": base_lr * mult, "lr_mult": mult, "weight_decay": weight_decay}
            for mult, params in sorted(by_mult.items())
        ]


def _validate_options(opts: dict[str, Any]) -> None:
    """Reject option values that cannot work, naming the option."""
    for key in ("use_cpc", "use_sii", "use_lii", "use_cii", "camera_embedding", "cmcl_squared"):
        if not isinstance(opts[key], bool):
            raise ValueError(f"xreid option {key} must be true or false, got {opts[key]!r}")
    for key, low in (("sii_depth", 1), ("lii_stride", 0)):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < low:
            raise ValueError(f"xreid option {key} must be an integer >= {low}, got {opts[key]!r}")
    if opts["cpc_pool"] not in CPC_POOLS:
        raise ValueError(
            f"xreid option cpc_pool must be one of {CPC_POOLS}, got {opts['cpc_pool']!r}"
        )
    if opts["cii_collapse_guard"] not in CII_GUARDS:
        raise ValueError(
            f"xreid option cii_collapse_guard must be one of {CII_GUARDS}, "
            f"got {opts['cii_collapse_guard']!r}"
        )
    if not 0.0 <= float(opts["cpc_momentum"]) <= 1.0:
        raise ValueError(
            f"xreid option cpc_momentum must be in [0, 1], got {opts['cpc_momentum']!r}"
        )
    if float(opts["cpc_temperature"]) <= 0:
        raise ValueError(
            f"xreid option cpc_temperature must be > 0, got {opts['cpc_temperature']!r}"
        )
    if opts["use_cii"] and not (opts["use_sii"] or opts["use_lii"]):
        raise ValueError("xreid option use_cii needs use_sii or use_lii (CII reads their outputs)")
