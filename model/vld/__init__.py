"""VLD: video-level language-driven VVI-ReID (STH + STA spatial-temporal prompting, IMLP)."""

from vvireid.model.vld.model import VLD, VLDOutput

__all__ = ["VLD", "VLDOutput"]
