"""The interface every re-ID method implements, so training, the indexer and the server stay generic."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from vvireid.model.backbone import ClipBackbone
from vvireid.model.config import ModelConfig
from vvireid.model.preprocess import PreprocessConfig

# The camid of a camera the model was not trained on (or of an unknown one).
UNKNOWN_CAMERA = -1


def check_camids(camids: torch.Tensor, num_cameras: int) -> None:
    """camids must be training camera indices in [0, num_cameras) or -1 (unknown).

    On the CPU a bad value is a ValueError naming the range. On a GPU the check is an asynchronous
    device assert: reading the values back would drain the GPU on every call and break a compiled
    graph. Callers with host camids (the encoder, the server) check them on the CPU first, so the
    device assert is only a backstop.
    """
    bad = (camids >= num_cameras) | (camids < UNKNOWN_CAMERA)
    if camids.device.type == "cuda":
        torch._assert_async(~bad.any(), "camids outside the training cameras")
        return
    if bool(bad.any()):
        raise ValueError(
            f"camids must be training camera indices in [0, {num_cameras}) or -1 (unknown), "
            f"got min {int(camids.min())}, max {int(camids.max())}; pass camids=None when the "
            "cameras are not the training ones"
        )


class ReIDModel(nn.Module):
    """Base class of the methods: a CLIP backbone plus a method head.

    Subclasses set ``method``, ``similarity`` and ``OPTIONS`` (their switches with defaults), and
    implement ``forward`` (training outputs, a frozen dataclass of named tensors), ``_encode``
    (the retrieval feature) and ``embed_dim``.

    ``similarity`` states what the features are meant for: ``"cosine"`` (L2-normalise, then inner
    product) or ``"inner_product"`` (raw dot product, as VLD's official evaluation ranks).
    """

    method: ClassVar[str] = ""
    similarity: ClassVar[str] = "cosine"
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: ModelConfig, *, with_text: bool = False) -> None:
        super().__init__()
        self.config = config
        self.backbone = ClipBackbone(config.backbone, config.image_size, with_text=with_text)
        self.fingerprint: str | None = None

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Merge user options over the defaults; an unknown option is an error naming it."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise ValueError(f"unknown option(s) for {cls.method}: {', '.join(unknown)} (known: {known})")
        return {**cls.OPTIONS, **options}

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.config.preprocess

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def feature_variants(self) -> dict[str, tuple[slice, ...]]:
        """Named parts of the retrieval feature that the method's official evaluator also scores.

        Only test-set model selection reads them (X-ReID keeps the epoch whose best variant per
        metric sums highest); each variant is the concatenation of its slices, compared with the
        model's similarity. The first entry is the retrieval feature itself.
        """
        return {"feature": (slice(None),)}

    def check_clips(self, clips: torch.Tensor) -> None:
        """Validate a batch of clips at the public boundary.

        Raises:
            ValueError: with the actual shape when it is not [B, T, 3, H, W] for this model.
        """
        height, width = self.config.image_size
        if clips.ndim != 5 or clips.shape[1] != self.seq_len or tuple(clips.shape[2:]) != (3, height, width):
            raise ValueError(
                f"clips must be [B, {self.seq_len}, 3, {height}, {width}], got {list(clips.shape)}"
            )

    @torch.no_grad()
    def encode(
        self, clips: torch.Tensor, camids: torch.Tensor | None = None, *, normalize: bool = True
    ) -> torch.Tensor:
        """The retrieval feature of each clip, computed in eval mode.

        With ``similarity == "cosine"`` the feature is L2-normalised; ``normalize=False`` returns
        it before that step, because a tracklet of several clips averages the un-normalised clip
        features and normalises the mean (X-ReID's official dense evaluation order; see
        ``vvireid.indexer.encode.tracklet_features``, the one place that does it).

        Shape: clips [B, T, 3, H, W], camids [B] or None -> feats [B, embed_dim].
        """
        self.check_clips(clips)
        was_training = self.training
        self.eval()
        try:
            feats = self._encode(clips, camids)
        finally:
            self.train(was_training)
        if normalize and self.similarity == "cosine":
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats

    def _encode(self, clips: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        """The clip feature before any normalisation (``encode`` applies the similarity's)."""
        raise NotImplementedError

    def param_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups with the method's learning-rate multipliers."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": base_lr, "weight_decay": weight_decay}]

    def load_pretrained(self, source: str) -> None:
        """Load CLIP weights (file or open_clip tag) into the backbone."""
        self.backbone.load_weights(source)
