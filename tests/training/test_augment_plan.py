"""The split augmentation (uint8 CPU part + batched device part) against the pre-split chain.

``reference_*`` below are the all-CPU, per-frame implementations the transforms had before the
split (numpy, normalise then erase then channel ops); every test draws both from generators with
the same seed and asserts the float clips agree to 1e-6.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from vvireid.model.types import Modality
from vvireid.training.data.transforms import (
    KEEP,
    LUMA,
    TO_LUMA,
    AugmentPlan,
    PlainTransform,
    VLDTransform,
    XReIDTransform,
    apply_plan,
    build_train_transform,
    erase_box,
)

SIZE = (32, 16)
TOL = 1e-6


# ---- the pre-split implementation ------------------------------------------------------------


def _ref_resize(t, image):
    height, width = t.image_size
    return np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))


def _ref_normalise(t, array):
    mean = np.asarray(t.mean, dtype=np.float32)
    std = np.asarray(t.std, dtype=np.float32)
    return ((array.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)


def _ref_vld_frame(t, frame, modality, exchange, rng):
    array = _ref_resize(t, frame)
    height, width = array.shape[:2]
    padded = np.zeros((height + 2 * t.pad, width + 2 * t.pad, 3), dtype=array.dtype)
    padded[t.pad : t.pad + height, t.pad : t.pad + width] = array
    top, left = (int(v) for v in rng.integers(0, 2 * t.pad + 1, 2))
    array = padded[top : top + height, left : left + width]
    array = _ref_normalise(t, array[:, ::-1] if rng.random() < t.flip_p else array)
    if rng.random() < t.erase_p:
        box = erase_box(rng, array.shape[1], array.shape[2], t.erase_area)
        if box is not None:
            top, left, h, w = box
            array[:, top : top + h, left : left + w] = np.asarray(t.erase_fill, np.float32)[:, None, None]
    if exchange:
        array[:] = array[int(rng.integers(3))]
    elif modality == Modality.INFRARED:
        choice = int(rng.integers(4))
        if choice < 3:
            array[:] = array[choice]
        elif rng.random() < t.adaptive_gray_p:
            array[:] = np.tensordot(LUMA, array, axes=1)
    return array


def _ref_xreid_clip(t, frames, rng):
    flip = rng.random() < t.flip_p
    out = []
    for frame in frames:
        array = _ref_resize(t, frame)
        array = array[:, ::-1].copy() if flip else array.copy()
        if rng.random() < t.erase_p:
            box = erase_box(rng, array.shape[0], array.shape[1], t.erase_area)
            if box is not None:
                top, left, h, w = box
                array[top : top + h, left : left + w] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(_ref_normalise(t, array))
    return out


def reference(t, frames, modality, rng):
    """The pre-split ``transform(frames, modality, rng)``: float [T, 3, H, W]."""
    if isinstance(t, VLDTransform):
        exchange = modality == Modality.VISIBLE and rng.random() < t.channel_exchange_p
        clip = [_ref_vld_frame(t, f, modality, exchange, rng) for f in frames]
    elif isinstance(t, XReIDTransform):
        clip = _ref_xreid_clip(t, frames, rng)
    else:
        clip = [_ref_normalise(t, _ref_resize(t, f)) for f in frames]
    return torch.from_numpy(np.ascontiguousarray(np.stack(clip)))


def reference_pair(t, rgb, ir, rng):
    if t.pair_flip_p > 0 and rng.random() < t.pair_flip_p:
        rgb = [f.transpose(Image.FLIP_LEFT_RIGHT) for f in rgb]
        ir = [f.transpose(Image.FLIP_LEFT_RIGHT) for f in ir]
    return reference(t, rgb, Modality.VISIBLE, rng), reference(t, ir, Modality.INFRARED, rng)


# ---- helpers ---------------------------------------------------------------------------------


def frames(n=6, seed=0, size=(20, 40), mode="RGB"):
    """Random frames of ``size`` (W, H); not the output size, so the resize is exercised."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
            for _ in range(n)]


def assert_close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max().item() <= TOL


METHODS = {
    "vld": lambda **kw: VLDTransform(SIZE, **kw),
    "xreid": lambda **kw: XReIDTransform(SIZE, **kw),
    "none": lambda **kw: PlainTransform(SIZE, **kw),
}


# ---- equality with the pre-split chain ----------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("modality", [Modality.VISIBLE, Modality.INFRARED])
def test_device_part_of_cpu_part_equals_the_old_transform(method, modality):
    t = METHODS[method]()
    for seed in range(12):
        clip = frames(6, seed)
        pixels, plan = t.plan(clip, modality, np.random.default_rng(seed))
        assert pixels.dtype == torch.uint8 and pixels.shape == (6, *SIZE, 3)
        assert_close(t.apply(pixels, plan), reference(t, clip, modality, np.random.default_rng(seed)))
        assert_close(t(clip, modality, np.random.default_rng(seed)), t.apply(pixels, plan))


@pytest.mark.parametrize("size,mode", [((16, 32), "RGB"), ((16, 32), "L"), ((33, 71), "RGB")])
def test_frames_at_output_size_grey_or_odd_sized_match(size, mode):
    """The CPU part skips PIL's resize for RGB frames already at size; values must not change."""
    for method in METHODS:
        t = METHODS[method]()
        clip = frames(5, 3, size=size, mode=mode)
        for modality in Modality:
            got = t(clip, modality, np.random.default_rng(1))
            assert_close(got, reference(t, clip, modality, np.random.default_rng(1)))


@pytest.mark.parametrize("method", list(METHODS))
def test_pairs_with_a_shared_flip_match(method):
    t = METHODS[method](pair_flip_p=0.5)
    flipped = set()
    for seed in range(10):
        rgb, ir = frames(4, seed), frames(4, seed + 100)
        (rgb_px, rgb_plan), (ir_px, ir_plan) = t.plan_pair(rgb, ir, np.random.default_rng(seed))
        want_rgb, want_ir = reference_pair(t, rgb, ir, np.random.default_rng(seed))
        assert_close(t.apply(rgb_px, rgb_plan), want_rgb)
        assert_close(t.apply(ir_px, ir_plan), want_ir)
        got_rgb, got_ir = t.pair(rgb, ir, np.random.default_rng(seed))
        assert_close(got_rgb, want_rgb) and assert_close(got_ir, want_ir)
        flipped.add(np.random.default_rng(seed).random() < 0.5)
    assert flipped == {True, False}  # both branches of the shared flip were compared


def test_every_channel_branch_is_exercised_and_matches():
    """ChannelExchange (each channel), ChannelAdapGray copy / luma / keep, and no op."""
    t = VLDTransform(SIZE)
    seen: dict[Modality, set[int]] = {Modality.VISIBLE: set(), Modality.INFRARED: set()}
    for seed in range(30):
        clip = frames(6, seed)
        for modality in Modality:
            pixels, plan = t.plan(clip, modality, np.random.default_rng(seed))
            seen[modality] |= set(plan.channels.tolist())
            want = reference(t, clip, modality, np.random.default_rng(seed))
            assert_close(t.apply(pixels, plan), want)
    assert seen[Modality.VISIBLE] == {KEEP, 0, 1, 2}  # coin off, and each exchanged channel
    assert seen[Modality.INFRARED] == {KEEP, 0, 1, 2, TO_LUMA}


def test_batched_device_part_equals_per_clip():
    """One call for a [B, T, ...] batch (what the trainer does) gives each clip's own result."""
    t = VLDTransform(SIZE)
    parts = [t.plan(frames(4, s), Modality(s % 2), np.random.default_rng(s)) for s in range(5)]
    pixels = torch.stack([p for p, _ in parts])
    plan = AugmentPlan(*(torch.stack(x) for x in zip(*(q for _, q in parts), strict=True)))
    batched = t.apply(pixels, plan)
    assert batched.shape == (5, 4, 3, *SIZE) and batched.is_contiguous()
    for i, (p, q) in enumerate(parts):
        assert torch.equal(batched[i], t.apply(p, q))
    joined = AugmentPlan.cat([plan, plan])
    assert joined.boxes.shape == (10, 4, 4) and torch.equal(joined.channels[5:], plan.channels)


def test_plan_records_the_erasing_and_crop_decisions():
    t = VLDTransform(SIZE, erase_p=1.0, channel_exchange_p=0.0)
    pixels, plan = t.plan(frames(8), Modality.VISIBLE, np.random.default_rng(0))
    assert (plan.boxes[:, 2] > 0).all() and (plan.channels == KEEP).all()
    assert torch.allclose(plan.fills, torch.tensor(t.erase_fill).expand(8, 3))
    area = (plan.boxes[:, 2] * plan.boxes[:, 3]).float() / (SIZE[0] * SIZE[1])
    assert ((area > 0.015) & (area < 0.45)).all()
    # the random crop of the zero-padded frame leaves black borders in the uint8 pixels
    assert any((pixels[i, 0] == 0).all() or (pixels[i, -1] == 0).all()
               or (pixels[i, :, 0] == 0).all() or (pixels[i, :, -1] == 0).all() for i in range(8))


def test_xreid_fill_is_the_normalised_colour():
    white = [Image.new("RGB", (16, 32), (255, 255, 255))] * 6
    t = XReIDTransform(SIZE, flip_p=0.0, erase_p=1.0)
    pixels, plan = t.plan(white, Modality.VISIBLE, np.random.default_rng(5))
    assert (pixels == 255).all()  # erasing is left to the device part
    out = t.apply(pixels, plan)
    plain = PlainTransform(SIZE)(white[:1], Modality.VISIBLE, None)[0]
    for f in range(6):
        top, left, h, w = plan.boxes[f].tolist()
        inside = torch.zeros(SIZE, dtype=torch.bool)
        inside[top : top + h, left : left + w] = True
        assert h * w > 0
        assert (out[f][:, inside] == plan.fills[f][:, None]).all()
        assert torch.equal(out[f][:, ~inside], plain[:, ~inside])


def test_apply_plan_rejects_bad_input_naming_it():
    t = PlainTransform(SIZE)
    pixels, plan = t.plan(frames(3), Modality.VISIBLE, None)
    with pytest.raises(ValueError, match="pixels: expected uint8"):
        apply_plan(pixels.float(), plan)
    with pytest.raises(ValueError, match="pixels: expected uint8"):
        apply_plan(pixels.movedim(-1, -3), plan)  # channels first is not the CPU part's layout
    with pytest.raises(ValueError, match="plan.channels"):
        apply_plan(pixels, plan._replace(channels=plan.channels[:2]))
    with pytest.raises(ValueError, match="plan.boxes"):
        apply_plan(pixels[None], plan)


def test_empty_plan_is_plain_normalisation():
    t = build_train_transform("none", SIZE)
    clip = frames(3)
    pixels, _ = t.plan(clip, Modality.INFRARED, None)
    assert_close(apply_plan(pixels, AugmentPlan.empty(3)), reference(t, clip, Modality.INFRARED, None))


@pytest.mark.parametrize("size", [(16, 32), (20, 40)])
def test_uint8_array_frames_give_the_pil_frames_result(size):
    """The dataset hands decoded arrays (load_pixels) to the transforms; same tensors as PIL."""
    for method in METHODS:
        t = METHODS[method](pair_flip_p=0.5)
        for seed in range(6):
            rgb, ir = frames(4, seed, size=size), frames(4, seed + 50, size=size)
            want = reference_pair(t, rgb, ir, np.random.default_rng(seed))
            got = t.pair([np.asarray(f) for f in rgb], [np.asarray(f) for f in ir],
                         np.random.default_rng(seed))
            assert_close(got[0], want[0]) and assert_close(got[1], want[1])
