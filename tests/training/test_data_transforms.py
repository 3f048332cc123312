"""Train-time augmentation: shapes, determinism and the behaviours each method relies on."""

import numpy as np
import pytest
import torch
from PIL import Image
from vvireid.model.config import ModelConfig
from vvireid.model.preprocess import FramePreprocessor
from vvireid.model.types import Modality
from vvireid.training.data.transforms import (
    VLD_ERASE_FILL,
    PlainTransform,
    VLDTransform,
    XReIDTransform,
    build_train_transform,
    erase_box,
)

SIZE = (32, 16)


def frames(n=6, seed=0, gray=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        array = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
        if gray:
            array[:] = array[..., :1]
        out.append(Image.fromarray(array))
    return out


@pytest.mark.parametrize("method", ["vld", "xreid", "none"])
def test_shape_dtype_and_determinism(method):
    transform = build_train_transform(method, SIZE)
    clip = frames()
    a = transform(clip, Modality.VISIBLE, np.random.default_rng(7))
    b = transform(clip, Modality.VISIBLE, np.random.default_rng(7))
    assert a.shape == (6, 3, 32, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    if method != "none":
        c = transform(clip, Modality.VISIBLE, np.random.default_rng(8))
        assert not torch.equal(a, c)


def test_plain_transform_matches_test_time_preprocessing():
    clip = frames(3)
    ours = build_train_transform("none", SIZE)(clip, Modality.INFRARED, np.random.default_rng(0))
    reference = FramePreprocessor(ModelConfig("baseline", 1, image_size=SIZE).preprocess)
    assert torch.allclose(ours, torch.stack([reference.frame_tensor(f) for f in clip]))


def test_vld_channel_exchange_copies_one_channel_per_frame():
    transform = VLDTransform(SIZE, channel_exchange_p=1.0, erase_p=0.0)
    out = transform(frames(8), Modality.VISIBLE, np.random.default_rng(0))
    assert all(torch.equal(f[0], f[1]) and torch.equal(f[1], f[2]) for f in out)
    transform = VLDTransform(SIZE, channel_exchange_p=0.0, erase_p=0.0)
    out = transform(frames(8), Modality.VISIBLE, np.random.default_rng(0))
    assert not any(torch.equal(f[0], f[1]) for f in out)


def test_vld_adaptive_gray_on_infrared_frames():
    clip = frames(1, gray=True) * 200
    base = VLDTransform(SIZE, pad=0, flip_p=0.0, erase_p=0.0, adaptive_gray_p=0.5)
    plain = PlainTransform(SIZE)(clip[:1], Modality.INFRARED, np.random.default_rng(0))[0]
    out = base(clip, Modality.INFRARED, np.random.default_rng(1))
    equal_channels = sum(bool(torch.equal(f[0], f[1]) and torch.equal(f[1], f[2])) for f in out)
    untouched = sum(bool(torch.equal(f, plain)) for f in out)
    assert equal_channels + untouched == 200
    assert 15 < untouched < 45  # expected 1/4 * 1/2 of the frames = 25


def test_vld_erasing_writes_the_constant_fill():
    transform = VLDTransform(SIZE, erase_p=1.0, channel_exchange_p=0.0)
    out = transform(frames(4), Modality.VISIBLE, np.random.default_rng(0))
    fill = torch.tensor(VLD_ERASE_FILL)[:, None]
    for f in out:
        flat = f.reshape(3, -1)
        erased = (flat == fill).all(dim=0).float().mean().item()
        assert 0.02 <= erased <= 0.41


def test_xreid_flip_is_shared_by_the_clip():
    clip = frames(5)
    plain = PlainTransform(SIZE)(clip, Modality.VISIBLE, np.random.default_rng(0))
    flipped = XReIDTransform(SIZE, flip_p=1.0, erase_p=0.0)(
        clip, Modality.VISIBLE, np.random.default_rng(0)
    )
    assert torch.equal(flipped, plain.flip(-1))
    seen = set()
    for seed in range(20):
        out = XReIDTransform(SIZE, erase_p=0.0)(clip, Modality.VISIBLE, np.random.default_rng(seed))
        per_frame = {bool(torch.equal(o, p.flip(-1))) for o, p in zip(out, plain, strict=True)}
        assert len(per_frame) == 1  # never a mix of flipped and unflipped frames
        seen |= per_frame
    assert seen == {True, False}


def test_xreid_erasing_lands_at_the_sampled_corner():
    """The official eraser always pastes at (h, w); ours must start elsewhere too."""
    white = [Image.new("RGB", (16, 32), (255, 255, 255))] * 40
    out = XReIDTransform(SIZE, flip_p=0.0, erase_p=1.0)(
        white, Modality.VISIBLE, np.random.default_rng(3)
    )
    at_official_spot = 0
    for f in out:
        mask = (f != f[:, :1, :1]).any(dim=0)
        if not mask.any():  # the random colour can equal white; vanishingly rare
            continue
        rows, cols = torch.nonzero(mask, as_tuple=True)
        top, left = rows.min().item(), cols.min().item()
        h, w = rows.max().item() - top + 1, cols.max().item() - left + 1
        assert mask.sum().item() == h * w  # one solid rectangle
        assert 0.02 * 512 <= h * w <= 0.2 * 512 + 16
        at_official_spot += (top, left) == (h, w)
    assert at_official_spot < 5


def test_pair_flip_is_shared_by_the_aligned_pair():
    rgb, ir = frames(3, seed=1), frames(3, seed=2, gray=True)
    plain = PlainTransform(SIZE)
    always = PlainTransform(SIZE, pair_flip_p=1.0)
    a, b = always.pair(rgb, ir, np.random.default_rng(0))
    assert torch.equal(a, plain(rgb, Modality.VISIBLE, None).flip(-1))
    assert torch.equal(b, plain(ir, Modality.INFRARED, None).flip(-1))
    assert build_train_transform("vld", SIZE, pair_flip=True).pair_flip_p == 0.5
    assert build_train_transform("vld", SIZE).pair_flip_p == 0.0


def test_erase_box_fits_and_unknown_method_is_rejected():
    rng = np.random.default_rng(0)
    for _ in range(100):
        top, left, h, w = erase_box(rng, 32, 16, (0.02, 0.4))
        assert top >= 0 and top + h <= 32 and left >= 0 and left + w <= 16
    assert erase_box(rng, 4, 4, (0.99, 1.0), min_aspect=0.99) is None
    with pytest.raises(ValueError, match="known: vld, xreid, none"):
        build_train_transform("caj", SIZE)
