"""ClipBackbone: the block-by-block forward equals open_clip; CLIP weights load from each format."""

from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from vvireid.model.backbone import TINY_MODEL, ClipBackbone, WeightsError, read_state_dict

IMAGE_SIZE = (64, 32)
GRID = (4, 2)
OPENAI_SCALARS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


def tiny_clip(**overrides: object) -> nn.Module:
    """A randomly initialised tiny CLIP at its native 224 px (a 14x14 grid: 197 positions)."""
    return open_clip.create_model(TINY_MODEL, pretrained=None, force_quick_gelu=True, **overrides)


@pytest.fixture(scope="module")
def clip_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.detach().clone().contiguous() for k, v in tiny_clip().state_dict().items()}


class _Node(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_openai_jit(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a TorchScript archive shaped like OpenAI's ``ViT-B-16.pt``: fp16 weights under the
    CLIP key names plus the scalars ``input_resolution``, ``context_length``, ``vocab_size``."""
    root = _Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Node())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value.half(), requires_grad=False))
    for key, value in OPENAI_SCALARS.items():
        root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(root), str(path))


def write_weights(kind: str, state: dict[str, torch.Tensor], folder: Path) -> Path:
    if kind == "openai_jit":
        path = folder / "ViT-tiny.pt"
        save_openai_jit(state, path)
    elif kind == "plain_pt":
        path = folder / "clip.pt"
        torch.save(state, path)
    elif kind == "plain_bin":
        path = folder / "open_clip_pytorch_model.bin"
        torch.save(state, path)
    elif kind == "wrapped_module":
        path = folder / "wrapped.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif kind == "safetensors":
        path = folder / "open_clip_model.safetensors"
        save_file(state, str(path))
    else:
        raise AssertionError(kind)
    return path


def test_block_forward_equals_open_clip_visual_and_encode_image() -> None:
    backbone = ClipBackbone(TINY_MODEL, IMAGE_SIZE).eval()
    frames = torch.randn(3, 3, *IMAGE_SIZE)
    with torch.no_grad():
        ours = backbone.ln_post(backbone.run_blocks(backbone.embed(frames)))[:, 0] @ backbone.proj
        theirs = backbone.visual(frames)
        reference = open_clip.create_model(
            TINY_MODEL, pretrained=None, force_image_size=IMAGE_SIZE, force_quick_gelu=True
        ).eval()
        reference.visual.load_state_dict(backbone.visual.state_dict())
        encoded = reference.encode_image(frames)
    assert backbone.grid == GRID
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, encoded, atol=1e-5, rtol=0)


def test_hook_sees_every_block_input_and_can_rewrite_tokens() -> None:
    backbone = ClipBackbone(TINY_MODEL, IMAGE_SIZE).eval()
    frames = torch.randn(2, 3, *IMAGE_SIZE)
    calls: list[tuple[int, int]] = []

    def hook(index: int, tokens: torch.Tensor) -> torch.Tensor:
        calls.append((index, tokens.shape[1]))
        return torch.cat([tokens, tokens[:, :1]], dim=1) if index == 2 else tokens

    with torch.no_grad():
        out = backbone.run_blocks(backbone.embed(frames), hook)
    length = 1 + GRID[0] * GRID[1]
    assert calls == [(0, length), (1, length), (2, length), (3, length + 1)]
    assert out.shape == (2, length + 1, backbone.width)


@pytest.mark.parametrize(
    "kind", ["openai_jit", "plain_pt", "plain_bin", "wrapped_module", "safetensors"]
)
def test_load_weights_from_each_format(
    kind: str, clip_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = write_weights(kind, clip_state, tmp_path)
    backbone = ClipBackbone(TINY_MODEL, IMAGE_SIZE, with_text=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load's "dispatching to torch.jit.load" notice
        backbone.load_weights(path)
    # The OpenAI archive stores fp16; everything else round-trips exactly.
    tol = {"atol": 2e-3, "rtol": 1e-3} if kind == "openai_jit" else {"atol": 0, "rtol": 0}
    visual = backbone.visual.state_dict()
    for key in (
        "conv1.weight",
        "transformer.resblocks.3.mlp.c_proj.bias",
        "proj",
        "class_embedding",
    ):
        torch.testing.assert_close(visual[key], clip_state[f"visual.{key}"], **tol)
    torch.testing.assert_close(
        backbone.text.token_embedding.weight, clip_state["token_embedding.weight"], **tol
    )
    assert backbone.visual.positional_embedding.dtype == torch.float32


def test_read_state_dict_drops_openai_scalars(
    clip_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = write_weights("openai_jit", clip_state, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = read_state_dict(path)
    assert set(state) == set(clip_state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_224px_positional_embedding_is_resized_bilinear_without_antialias(
    clip_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = write_weights("safetensors", clip_state, tmp_path)
    backbone = ClipBackbone(TINY_MODEL, IMAGE_SIZE)
    backbone.load_weights(path)
    pos = clip_state["visual.positional_embedding"]  # [1 + 14*14, D]
    width = pos.shape[1]
    grid = pos[1:].reshape(1, 14, 14, width).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=GRID, mode="bilinear", align_corners=False, antialias=False)
    expected = torch.cat([pos[:1], expected.permute(0, 2, 3, 1).reshape(-1, width)])
    got = backbone.visual.positional_embedding
    assert got.shape == (1 + GRID[0] * GRID[1], width)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    antialiased = F.interpolate(
        grid, size=GRID, mode="bicubic", align_corners=False, antialias=True
    )
    assert not torch.allclose(got[1:], antialiased.permute(0, 2, 3, 1).reshape(-1, width))


@pytest.mark.parametrize("kind", ["openai_jit", "plain_pt", "wrapped_module", "safetensors"])
def test_truncated_weights_file_raises_naming_it(
    kind: str, clip_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = write_weights(kind, clip_state, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    backbone = ClipBackbone(TINY_MODEL, IMAGE_SIZE)
    with pytest.raises(WeightsError, match=path.name):
        backbone.load_weights(path)


def test_wrong_architecture_raises_naming_the_file(tmp_path: Path) -> None:
    narrow = {"image_size": 224, "layers": 4, "width": 32, "head_width": 16, "patch_size": 16}
    state = tiny_clip(vision_cfg=narrow).state_dict()
    path = write_weights("safetensors", {k: v.contiguous() for k, v in state.items()}, tmp_path)
    backbone = ClipBackbone(TINY_MODEL, IMAGE_SIZE)
    with pytest.raises(WeightsError, match=path.name) as info:
        backbone.load_weights(path)
    assert "do not fit" in str(info.value)


def test_not_a_clip_checkpoint_and_missing_file_raise(tmp_path: Path) -> None:
    backbone = ClipBackbone(TINY_MODEL, IMAGE_SIZE)
    other = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(WeightsError, match="resnet.pt.*visual"):
        backbone.load_weights(other)
    with pytest.raises(WeightsError, match="missing.safetensors"):
        backbone.load_weights(tmp_path / "missing.safetensors")


def test_demo_backbone_has_a_conv_stem_with_the_vit_token_grid(tmp_path: Path) -> None:
    """vvireid-demo: same tokens as the tiny ViT (CLS + 4x2 patches at 64x32), a trainable
    convolutional patchify, and a clear refusal of CLIP weights it cannot hold."""
    demo, tiny = ClipBackbone("vvireid-demo", IMAGE_SIZE), ClipBackbone(TINY_MODEL, IMAGE_SIZE)
    frames = torch.randn(3, 3, *IMAGE_SIZE)
    tokens = demo(frames)
    assert tokens.shape == tiny(frames).shape == (3, 1 + GRID[0] * GRID[1], demo.width)
    assert any(isinstance(m, nn.BatchNorm2d) for m in demo.visual.conv1.modules())
    tokens.sum().backward()
    assert all(p.grad is not None for p in demo.visual.conv1.parameters())
    path = write_weights("safetensors", {"visual.conv1.weight": torch.zeros(64, 3, 16, 16)}, tmp_path)
    with pytest.raises(WeightsError, match="convolutional patch stem"):
        demo.load_weights(path)
