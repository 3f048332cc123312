"""VLD's invariant-modality language prompting (IMLP, paper section III-C): one learnable text
prompt per training identity, read by CLIP's frozen text encoder.

The prompt of identity k is the template with its placeholder words replaced by k's own learnable
context vectors (nothing is shared across identities). The resulting text features act as an
identity classifier for both modalities: the visual-to-text loss pulls RGB and IR features of k
toward the same text feature.
"""

from __future__ import annotations

import torch
from torch import nn
from vvireid.model.text import TextTower

PLACEHOLDER = "X"


class IdentityPrompts(nn.Module):
    """Per-identity context ``cls_ctx`` [C, n, W] (N(0, 0.02)) spliced into a fixed template.

    The fixed template embeddings are recomputed from the frozen token embedding at each call
    rather than stored: they cannot go stale when CLIP weights are loaded after construction, and
    they cost one 77-token lookup. Only ``cls_ctx`` is trained.

    Raises:
        ValueError: if the template does not hold exactly ``num_tokens`` consecutive placeholders.
    """

    def __init__(self, text: TextTower, num_classes: int, template: str, num_tokens: int) -> None:
        super().__init__()
        ids = text.tokenize([template])[0]
        self.start = _placeholder_start(ids, text, template, num_tokens)
        self.num_tokens = num_tokens
        self.eot_index = int(ids.argmax())  # EOT has the largest id in CLIP's vocabulary
        self.register_buffer("template_ids", ids, persistent=False)
        self.cls_ctx = nn.Parameter(torch.empty(num_classes, num_tokens, text.width))
        nn.init.normal_(self.cls_ctx, std=0.02)

    @property
    def num_classes(self) -> int:
        return self.cls_ctx.shape[0]

    def embeddings(self, text: TextTower) -> torch.Tensor:
        """Every identity's prompt as token embeddings. Shape: [C, 77, W]."""
        fixed = text.token_embeddings(self.template_ids.unsqueeze(0))
        prefix = fixed[:, : self.start].expand(self.num_classes, -1, -1)
        suffix = fixed[:, self.start + self.num_tokens :].expand(self.num_classes, -1, -1)
        return torch.cat([prefix, self.cls_ctx.to(fixed.dtype), suffix], dim=1)

    def forward(self, text: TextTower) -> torch.Tensor:
        """Text features of all identities, not normalised. Shape: [C, E].

        The tower runs on the tokens up to EOT only (``TextTower.encode_embeddings``): the same
        features for about a fifth of the cost of all 77 positions, every training step.
        """
        eot = torch.full((self.num_classes,), self.eot_index, device=self.cls_ctx.device)
        return text.encode_embeddings(self.embeddings(text)[:, : self.eot_index + 1], eot)


def _placeholder_start(ids: torch.Tensor, text: TextTower, template: str, num_tokens: int) -> int:
    """Position of the first of ``num_tokens`` consecutive placeholder tokens in ``ids``."""
    placeholder_id = int(text.tokenize([PLACEHOLDER])[0, 1])
    positions = torch.nonzero(ids == placeholder_id).flatten().tolist()
    contiguous = bool(positions) and positions == list(
        range(positions[0], positions[0] + num_tokens)
    )
    if len(positions) != num_tokens or not contiguous:
        raise ValueError(
            f"prompt_template {template!r} must contain exactly num_prompt_tokens={num_tokens} "
            f"consecutive {PLACEHOLDER!r} placeholders, found {len(positions)}"
        )
    return positions[0]
