"""The plain CLIP baseline ("B" in the VLD ablations): CLIP ViT, temporal average pooling, BN + CE
identity heads and WRT triplets. No hub, no STA, no text prompts.

It is VLD with every module pinned off rather than a second copy of the same network, so the two
can never drift apart; its retrieval feature is the mean ``ln_post`` CLS token (768-d for ViT-B/16).
"""

from __future__ import annotations

from typing import Any, ClassVar

from vvireid.model.vld.model import VLD


class BaselineModel(VLD):
    """VLD's CLIP-driven baseline; it takes no options."""

    method: ClassVar[str] = "baseline"
    OPTIONS: ClassVar[dict[str, Any]] = {}
    FORCED: ClassVar[dict[str, Any]] = {"use_sth": False, "use_sta": False, "use_imlp": False}
