"""Weight-file vocabulary shared by the visual adapter and the text tower.

A module of its own so that ``backbone`` can build the text tower without ``text`` importing
``backbone`` back (the two were a cycle).
"""

from __future__ import annotations

# Key prefixes of a full CLIP state dict that belong to the text tower.
_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class WeightsError(ValueError):
    """A weights file or tag cannot be used; the message names the source and the problem."""


def is_text_key(key: str) -> bool:
    """Whether a full-CLIP state-dict key belongs to the text tower."""
    return key.startswith(_TEXT_PREFIXES)
