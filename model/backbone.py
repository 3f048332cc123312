"""The single adapter to open_clip: a CLIP ViT run block by block, and its weight loading.

Why run blocks by hand: VLD inserts hub tokens at an intermediate block and X-ReID adds a camera
embedding to the CLS token before the positional embedding; neither is reachable through
``encode_image``. Everything that touches open_clip's private visual internals lives here (and the
text tower in ``model/text.py``), pinned to ``open_clip_torch==3.3.*`` and guarded by a parity test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from vvireid.model.text import TextTower
from vvireid.model.weights import WeightsError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_MODEL = "vvireid-tiny"
# Small configs trained from random init (the demo) whose patchify is a convolutional stem: a plain
# ViT from scratch cannot learn a cross-modal re-ID feature in CPU minutes, an early-convolution one
# can (Xiao et al., "Early Convolutions Help Transformers See Better", 2021). CLIP configs never get it.
CONV_STEM_MODELS = frozenset({"vvireid-demo"})
# Keys of OpenAI's TorchScript state dict that are scalars, not weights.
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")

BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


def register_tiny_configs() -> None:
    """Make the shipped small configs (``vvireid-tiny``) known to open_clip; idempotent."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square-grid positional embedding to ``grid`` (rows, cols).

    Bilinear, align_corners=False, no antialias: what the VLD and X-ReID code do. open_clip's own
    resize is bicubic with antialias and differs by ~21% on a 14->9 width downsample.

    Shape: [1 + g*g, D] -> [1 + rows*cols, D]; the CLS row is kept as is.
    """
    cls_row, grid_rows = pos[:1], pos[1:]
    side = int(round(grid_rows.shape[0] ** 0.5))
    if side * side != grid_rows.shape[0]:
        raise WeightsError(f"positional embedding of {pos.shape[0]} rows is not 1 + a square grid")
    image = grid_rows.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(image, size=grid, mode="bilinear", align_corners=False, antialias=False)
    resized = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_row, resized], dim=0)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict, a ``{'state_dict': ...}`` wrapper, or an OpenAI TorchScript archive."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as exc:
        if "TorchScript" not in str(exc) and "jit" not in str(exc).lower():
            raise WeightsError(f"{path}: cannot read weights ({exc})") from None
        try:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as jit_exc:
            raise WeightsError(f"{path}: corrupt TorchScript archive ({jit_exc})") from None
    except (EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: truncated or corrupt weights file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise WeightsError(f"{path}: not a weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return dict(obj)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read CLIP weights from ``.safetensors``, ``.pt``/``.bin``/``.pth`` or an OpenAI JIT archive.

    Raises:
        WeightsError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
    else:
        state = _read_torch_file(path)
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _OPENAI_SCALARS}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _state_dict_from_tag(name: str, tag: str) -> dict[str, torch.Tensor]:
    """Download an open_clip pretrained tag (needs network) and return its 224-px state dict."""
    try:
        clip = open_clip.create_model(name, pretrained=tag, force_quick_gelu=True)
    except Exception as exc:  # noqa: BLE001 - hub/network errors have many types
        raise WeightsError(f"pretrained tag {name}:{tag}: cannot load ({exc})") from None
    return clip.state_dict()


class ConvStem(nn.Sequential):
    """Patchify by stride-2 3x3 convolutions (BN, ReLU) and a 1x1 projection: same token grid as a
    ``patch x patch`` stride-``patch`` convolution, with the locality prior a from-scratch ViT lacks.
    """

    def __init__(self, width: int, patch: int) -> None:
        steps = patch.bit_length() - 1
        if patch < 2 or 1 << steps != patch:
            raise ValueError(f"conv stem needs a power-of-two patch size, got {patch}")
        layers: list[nn.Module] = []
        channels = 3
        for i in range(steps):
            out = min(width, 16 << i)
            layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        super().__init__(*layers)


_OPEN_CLIP_DIR = str(Path(open_clip.__file__).resolve().parent)


def _is_open_clip_factory_noise(record: logging.LogRecord) -> bool:
    """open_clip's INFO chatter and its "Model initialized randomly" warning (root logger)."""
    # realpath: the interpreter may reach open_clip through a symlinked venv (a different string).
    if not os.path.realpath(record.pathname).startswith(_OPEN_CLIP_DIR):
        return False
    return record.levelno < logging.WARNING or "initialized randomly" in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip_factory() -> Iterator[None]:
    """Silence what open_clip logs while building the architecture with ``pretrained=None``.

    Why: a backbone is always built empty and filled right after (CLIP weights through
    ``load_weights``, a trained checkpoint through ``load_state_dict``, or random init that the
    recipe asked for), so open_clip's "No pretrained weights loaded ... Model initialized
    randomly" warning is wrong every time it would show, and it showed once per model built.
    Errors and other warnings still pass.
    """

    def keep(record: logging.LogRecord) -> bool:
        return not _is_open_clip_factory_noise(record)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class ClipBackbone(nn.Module):
    """CLIP ViT visual tower (and optionally the text tower) with a block-by-block forward.

    Built with QuickGELU (OpenAI weights were trained with it) at a forced, possibly non-square
    image size; 288x144 gives an 18x9 patch grid and 163 tokens.
    """

    def __init__(
        self,
        name: str,
        image_size: tuple[int, int],
        *,
        with_text: bool = False,
    ) -> None:
        super().__init__()
        register_tiny_configs()
        self.name = name
        with _quiet_open_clip_factory():
            clip = open_clip.create_model(
                name, pretrained=None, force_image_size=tuple(image_size), force_quick_gelu=True
            )
        self.visual = clip.visual
        if name in CONV_STEM_MODELS:
            patch = self.visual.conv1.kernel_size[0]
            self.visual.conv1 = ConvStem(self.visual.conv1.out_channels, patch)
        self.text = None
        if with_text:
            self.text = TextTower(clip, name)
        self.width = int(self.visual.class_embedding.shape[0])
        self.proj_dim = int(self.visual.proj.shape[1])
        self.grid = tuple(self.visual.grid_size)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def ln_post(self) -> nn.LayerNorm:
        return self.visual.ln_post

    @property
    def proj(self) -> torch.Tensor:
        return self.visual.proj

    def embed(self, frames: torch.Tensor, cls_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Patchify, prepend CLS (plus ``cls_bias``, e.g. a camera embedding), add positions, ln_pre.

        Shape: frames [N, 3, H, W], cls_bias [N, D] -> tokens [N, 1 + rows*cols, D].
        """
        visual = self.visual
        patches = visual.conv1(frames).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        if cls_bias is not None:
            cls = cls + cls_bias.to(patches.dtype).unsqueeze(1)
        tokens = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        return visual.ln_pre(visual.patch_dropout(tokens))

    def run_blocks(self, tokens: torch.Tensor, hook: BlockHook | None = None) -> torch.Tensor:
        """Run every transformer block; ``hook(i, tokens)`` may rewrite tokens before block i.

        Returns the raw output of the last block (before ``ln_post``).
        """
        for i, block in enumerate(self.blocks):
            if hook is not None:
                tokens = hook(i, tokens)
            tokens = block(tokens)
        return tokens

    def forward(self, frames: torch.Tensor, cls_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Final tokens after ``ln_post``. Shape: [N, 3, H, W] -> [N, L, D]."""
        return self.ln_post(self.run_blocks(self.embed(frames, cls_bias)))

    def load_weights(self, source: str | Path) -> None:
        """Load CLIP weights from a file (see ``read_state_dict``) or an open_clip pretrained tag.

        The 224-px positional embedding is resized to this model's grid (bilinear, no antialias).

        Raises:
            WeightsError: the file is missing, corrupt, or holds weights of another architecture.
        """
        if self.name in CONV_STEM_MODELS:
            raise WeightsError(
                f"{source}: backbone {self.name} has a convolutional patch stem and trains from "
                "random init; CLIP weights need a CLIP ViT config such as ViT-B-16"
            )
        path = Path(source)
        if path.suffix or path.exists() or "/" in str(source):
            state, label = read_state_dict(path), str(path)
        else:
            state, label = _state_dict_from_tag(self.name, str(source)), f"tag {source}"
        self._load_visual(state, label)
        if self.text is not None:
            self.text.load_clip_state(state, label)
        log.info("loaded CLIP weights from %s", label)

    def _load_visual(self, state: dict[str, torch.Tensor], label: str) -> None:
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise WeightsError(f"{label}: no 'visual.*' keys; not a CLIP checkpoint")
        pos = visual.get("positional_embedding")
        want = self.visual.positional_embedding.shape
        if pos is not None and pos.shape != want and pos.shape[1:] == want[1:]:
            visual["positional_embedding"] = resize_pos_embed(pos, self.grid)
        try:
            self.visual.load_state_dict(visual, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{label}: weights do not fit {self.name}: {exc}") from None
