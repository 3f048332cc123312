"""The frozen CLIP text tower, run on prompt embeddings (CoOp / CLIP-ReID style).

Learnable prompts replace some token embeddings of a template; the text transformer stays frozen
and gradients flow through it into the prompt tokens only.
"""

from __future__ import annotations

import open_clip
import torch
from torch import nn
from vvireid.model.weights import WeightsError, is_text_key


class TextTower(nn.Module):
    """open_clip's text transformer, ``ln_final`` and projection, frozen.

    Shape: ``encode_embeddings``: [n, L, W] prompt embeddings + [n] EOT positions -> [n, E].
    """

    def __init__(self, clip: nn.Module, name: str) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self._tokenizer = open_clip.get_tokenizer(name)
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """CLIP BPE token ids, context 77. Shape: [n] strings -> [n, 77] int64."""
        return self._tokenizer(texts)

    @torch.no_grad()
    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of fixed template tokens. Shape: [n, L] -> [n, L, W]."""
        return self.token_embedding(ids.to(self.token_embedding.weight.device))

    def encode_embeddings(self, prompts: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Run the frozen tower on prompt embeddings; pool at the EOT token; project.

        ``prompts`` may stop right after their EOT token (L < 77): under CLIP's causal mask no
        later position reaches the EOT, so the pooled feature is the same and the cost is L/77.
        """
        length = prompts.shape[1]
        x = prompts + self.positional_embedding[:length].to(prompts.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def load_clip_state(self, state: dict[str, torch.Tensor], label: str) -> None:
        """Load the text-tower keys of a full CLIP state dict (strict)."""
        text = {k: v for k, v in state.items() if is_text_key(k)}
        try:
            self.load_state_dict(text, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{label}: text tower weights do not fit: {exc}") from None
