"""Procedural pedestrians for the synthetic datasets, drawn in a visible and an infrared look.

Every identity is a parameter set: body height and width, head size, hair, upper/lower clothing
colours and pattern, sleeves, trousers/shorts/skirt, a carried item (backpack, shoulder bag, hand
bag) and a gait (stride, speed, arm swing). A frame is drawn once as a *part map* (an integer code
per pixel: skin, hair, upper, lower, shoes, bag ...) and then coloured per modality:

* visible: the clothing colours over a muted, camera-specific street scene, per-tracklet
  illumination gain and colour cast, soft side lighting, sensor noise;
* infrared: thermal-like intensities. Skin is bright (body heat); clothing takes the *emissivity*
  of its dye, a fixed non-monotonic function of the visible colour that is anti-correlated with
  luminance (a dark shirt is bright in IR and a white one dark); dye patterns barely show; the
  scene is cold with a few warm objects; thermal blur, column (fixed-pattern) noise, grey
  3-channel output.

Shape, carried items, gait and each identity's IR signature stay learnable across modalities,
while raw pixel values do not carry over. All randomness comes from generators seeded by
``(seed, purpose, keys...)``, so the same arguments always give the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from vvireid.model.types import Modality

BG, SKIN, HAIR, UPPER, UPPER2, LOWER, LOWER2, SHOES, BAG = range(9)
NUM_CODES = 9
NOISE_MARGIN = 8
_PURPOSE = {
    "identity": 1,
    "camera": 2,
    "plan": 3,
    "tracklet": 4,
    "split": 5,
    "camera_scale": 6,
    "columns": 7,
}


def seeded_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, purpose, keys): draws never depend on call order."""
    return np.random.default_rng([seed, _PURPOSE[purpose], *keys])


@dataclass(frozen=True, eq=False)
class Identity:
    """Appearance and gait of one synthetic person (visible colours and IR intensities per part)."""

    pid: int
    height: float
    width: float
    head: float
    long_hair: bool
    upper_pattern: str
    lower_kind: str
    long_sleeves: bool
    bag: str
    stride: float
    speed: float
    arm_swing: float
    visible: np.ndarray = field(repr=False)
    infrared: np.ndarray = field(repr=False)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random clothing colour (HSV), with many dark or desaturated picks as in real streets."""
    hue = rng.uniform(0, 1)
    sat = rng.choice([rng.uniform(0.0, 0.2), rng.uniform(0.35, 0.95)])
    val = rng.uniform(0.12, 0.95)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return (val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)) * 255


def _visible_palette(rng: np.random.Generator) -> np.ndarray:
    visible = np.zeros((NUM_CODES, 3))
    visible[SKIN] = np.array([224, 172, 140]) * rng.uniform(0.45, 1.08) + rng.uniform(-8, 8, 3)
    visible[HAIR] = np.array([60, 45, 35]) * rng.uniform(0.3, 2.2)
    visible[UPPER], visible[UPPER2] = _colour(rng), _colour(rng)
    visible[LOWER], visible[LOWER2] = _colour(rng), _colour(rng)
    visible[SHOES] = _colour(rng) * 0.7
    visible[BAG] = _colour(rng)
    return visible.astype(np.float32)


def _emissivity(rgb: np.ndarray) -> float:
    """Thermal intensity of a dyed fabric: a fixed, non-monotonic function of its visible colour.

    Dark dyes absorb and re-radiate (bright in IR), light ones reflect the cold scene (dark), and
    the hue shifts it further, so the IR image is anti-correlated with visible luminance (raw pixel
    matching fails) while the mapping stays the same for everyone (a model can learn it).
    """
    value = float(rgb.max()) / 255.0
    low = float(rgb.min()) / 255.0
    sat = 0.0 if value == 0 else (value - low) / value
    hue = math.atan2(math.sqrt(3) * (rgb[1] - rgb[2]), 2 * rgb[0] - rgb[1] - rgb[2])
    return 215.0 - 150.0 * value + 45.0 * sat * math.cos(hue - 0.6)


def _thermal_palette(rng: np.random.Generator, visible: np.ndarray) -> np.ndarray:
    """Skin radiates body heat; clothing by the emissivity of its dye, plus a little material noise."""
    infrared = np.zeros(NUM_CODES)
    infrared[SKIN] = rng.uniform(205, 245)
    infrared[HAIR] = rng.uniform(55, 110)
    for part in (UPPER, UPPER2, LOWER, LOWER2, BAG):
        infrared[part] = _emissivity(visible[part]) + rng.uniform(-10, 10)
    infrared[SHOES] = rng.uniform(45, 100)
    return np.clip(infrared, 0, 255).astype(np.float32)


def make_identity(seed: int, pid: int) -> Identity:
    """Draw one identity; the same (seed, pid) always gives the same person."""
    rng = seeded_rng(seed, "identity", pid)
    visible = _visible_palette(rng)
    infrared = _thermal_palette(rng, visible)
    return Identity(
        pid=pid,
        height=rng.uniform(0.78, 0.95),
        width=rng.uniform(0.8, 1.25),
        head=rng.uniform(0.9, 1.12),
        long_hair=bool(rng.random() < 0.35),
        upper_pattern=str(rng.choice(["solid", "solid", "hstripes", "vstripes", "blocks"])),
        lower_kind=str(rng.choice(["trousers", "trousers", "shorts", "skirt"])),
        long_sleeves=bool(rng.random() < 0.6),
        bag=str(rng.choice(["none", "none", "backpack", "shoulder", "hand"])),
        stride=rng.uniform(0.18, 0.42),
        speed=rng.uniform(0.35, 0.75),
        arm_swing=rng.uniform(0.12, 0.4),
        visible=visible,
        infrared=infrared,
    )


@dataclass(frozen=True)
class Pose:
    """Where a person stands in one frame: centre x, feet y, height in pixels, gait phase."""

    cx: float
    foot: float
    height: float
    phase: float


@dataclass(frozen=True)
class _Body:
    """Key lines of a body in one frame (pixels): shoulder/waist widths and heights."""

    cx: float
    h: float
    top: float
    sw: float
    ww: float
    y_sh: float
    y_waist: float
    y_hip: float

    @classmethod
    def of(cls, ident: Identity, pose: Pose) -> _Body:
        h = pose.height
        top = pose.foot - h + 0.012 * h * abs(math.sin(pose.phase))  # walking bob
        return cls(
            cx=pose.cx,
            h=h,
            top=top,
            sw=0.25 * h * ident.width,
            ww=0.19 * h * ident.width,
            y_sh=top + 0.16 * h,
            y_waist=top + 0.52 * h,
            y_hip=top + 0.55 * h,
        )


def _limb(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    angle: float,
    length: float,
    width: float,
    codes: list[tuple[float, int]],
) -> tuple[float, float]:
    """Draw a straight limb as segments ``(fraction of length, code)``; returns its end."""
    x0, y0 = start
    done = 0.0
    for fraction, code in codes:
        a, b = done, done + fraction
        p = (x0 + length * a * math.sin(angle), y0 + length * a * math.cos(angle))
        q = (x0 + length * b * math.sin(angle), y0 + length * b * math.cos(angle))
        draw.line([p, q], fill=code, width=max(1, round(width)))
        done = b
    return x0 + length * math.sin(angle), y0 + length * math.cos(angle)


def _draw_legs(draw: ImageDraw.ImageDraw, ident: Identity, body: _Body, pose: Pose) -> None:
    codes = {
        "trousers": [(1.0, LOWER)],
        "shorts": [(0.4, LOWER), (0.6, SKIN)],
        "skirt": [(1.0, SKIN)],
    }[ident.lower_kind]
    leg_len, leg_w = pose.foot - body.y_hip, 0.085 * body.h * ident.width
    swing = ident.stride * math.sin(pose.phase)
    for side, angle in ((-1, swing), (1, -swing)):
        start = (body.cx + side * body.ww * 0.25, body.y_hip)
        x, y = _limb(draw, start, angle, leg_len * 0.97, leg_w, codes)
        draw.ellipse(
            [x - leg_w * 0.8, y - leg_w * 0.45, x + leg_w * 0.8, y + leg_w * 0.35], fill=SHOES
        )


def _draw_trunk(draw: ImageDraw.ImageDraw, ident: Identity, body: _Body) -> None:
    cx, ww, h = body.cx, body.ww, body.h
    hips = [(cx - ww / 2, body.y_waist), (cx + ww / 2, body.y_waist)]
    draw.polygon(
        hips + [(cx + ww / 2, body.y_hip + 0.05 * h), (cx - ww / 2, body.y_hip + 0.05 * h)],
        fill=LOWER,
    )
    if ident.lower_kind == "skirt":
        hem = body.top + 0.72 * h
        draw.polygon(hips + [(cx + ww * 0.8, hem), (cx - ww * 0.8, hem)], fill=LOWER)
    shoulders = [(cx - body.sw / 2, body.y_sh), (cx + body.sw / 2, body.y_sh)]
    draw.polygon(shoulders + hips[::-1], fill=UPPER)


def _draw_arms(draw: ImageDraw.ImageDraw, ident: Identity, body: _Body, pose: Pose) -> float:
    """Both arms swinging against the legs; returns the x of the right hand (for hand bags)."""
    codes = [(1.0, UPPER)] if ident.long_sleeves else [(0.35, UPPER), (0.65, SKIN)]
    hand_x, r = body.cx, 0.025 * body.h
    for side in (-1, 1):
        angle = side * (0.08 - ident.arm_swing * math.sin(pose.phase))
        start = (body.cx + side * body.sw / 2, body.y_sh + 0.02 * body.h)
        x, y = _limb(draw, start, angle, 0.32 * body.h, 0.06 * body.h * ident.width, codes)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=SKIN)
        hand_x = x if side == 1 else hand_x
    return hand_x


def _draw_head(draw: ImageDraw.ImageDraw, ident: Identity, body: _Body) -> None:
    cx, h = body.cx, body.h
    draw.rectangle([cx - 0.03 * h, body.top + 0.11 * h, cx + 0.03 * h, body.y_sh], fill=SKIN)
    rx, ry, cy = 0.055 * h * ident.head, 0.068 * h * ident.head, body.top + 0.07 * h
    if ident.long_hair:
        draw.rectangle([cx - rx * 1.1, cy, cx + rx * 1.1, body.y_sh + 0.06 * h], fill=HAIR)
    draw.ellipse([cx - rx * 1.05, cy - ry * 1.08, cx + rx * 1.05, cy + ry], fill=HAIR)
    draw.ellipse([cx - rx * 0.9, cy - ry * 0.55, cx + rx * 0.9, cy + ry], fill=SKIN)


def _draw_carried(
    draw: ImageDraw.ImageDraw, ident: Identity, body: _Body, pose: Pose, hand_x: float
) -> None:
    """Carried items in front of the body (the backpack itself is drawn behind it)."""
    cx, sw, h = body.cx, body.sw, body.h
    if ident.bag == "backpack":
        for side in (-1, 1):
            strap = [
                (cx + side * sw * 0.3, body.y_sh),
                (cx + side * sw * 0.34, body.y_waist - 0.05 * h),
            ]
            draw.line(strap, fill=BAG, width=max(1, round(0.02 * h)))
    elif ident.bag == "shoulder":
        draw.line(
            [(cx - sw / 2, body.y_sh), (cx + sw * 0.45, body.y_waist)],
            fill=BAG,
            width=max(1, round(0.018 * h)),
        )
        draw.rectangle(
            [cx + sw * 0.3, body.y_waist - 0.02 * h, cx + sw * 0.75, body.y_waist + 0.09 * h],
            fill=BAG,
        )
    elif ident.bag == "hand":
        y = pose.foot - 0.42 * h
        draw.rectangle([hand_x - 0.05 * h, y, hand_x + 0.05 * h, y + 0.09 * h], fill=BAG)


def _apply_pattern(parts: np.ndarray, ident: Identity, body: _Body) -> None:
    """Stripes or blocks on the upper garment, a band pattern on the lower one."""
    period = max(2, round(0.045 * body.h))
    yy, xx = np.arange(parts.shape[0])[:, None], np.arange(parts.shape[1])[None, :]
    upper = parts == UPPER
    if ident.upper_pattern == "hstripes":
        parts[upper & (((yy - round(body.y_sh)) // period) % 2 == 1)] = UPPER2
    elif ident.upper_pattern == "vstripes":
        parts[upper & (((xx - round(body.cx)) // period) % 2 == 1)] = UPPER2
    elif ident.upper_pattern == "blocks":
        parts[upper & (yy > (body.y_sh + body.y_waist) / 2)] = UPPER2
    lower = parts == LOWER
    parts[lower & (((yy - round(body.y_waist)) // (2 * period)) % 3 == 2)] = LOWER2


def render_parts(ident: Identity, pose: Pose, size: tuple[int, int]) -> np.ndarray:
    """The part map [H, W] (uint8 codes) of one frame, clothing pattern included."""
    height, width = size
    canvas = Image.new("L", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    body = _Body.of(ident, pose)
    if ident.bag == "backpack":
        h = body.h
        box = [
            body.cx - body.sw / 2 - 0.04 * h,
            body.y_sh + 0.02 * h,
            body.cx + body.sw / 2 + 0.06 * h,
            body.y_waist - 0.03 * h,
        ]
        draw.rectangle(box, fill=BAG)
    _draw_legs(draw, ident, body, pose)
    _draw_trunk(draw, ident, body)
    hand_x = _draw_arms(draw, ident, body, pose)
    _draw_head(draw, ident, body)
    _draw_carried(draw, ident, body, pose, hand_x)
    parts = np.asarray(canvas).copy()
    _apply_pattern(parts, ident, body)
    return parts


def _smooth_noise(
    rng: np.random.Generator, size: tuple[int, int], cells: int, amplitude: float
) -> np.ndarray:
    """Low-frequency noise: a coarse random grid resized bilinearly to ``size``."""
    coarse = rng.normal(0, 1, (cells, max(2, cells // 2))).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image) * amplitude


def camera_background(
    seed: int, camid: int, modality: Modality, size: tuple[int, int]
) -> np.ndarray:
    """A camera's empty scene, 1.5x wider than a frame so tracklets can see different parts of it.

    Visible: float [H, 1.5W, 3] muted street scene (in real crops the person dominates the pixel
    statistics). Infrared: float [H, 1.5W] cold scene with a few warm objects.
    """
    rng = seeded_rng(seed, "camera", camid, int(modality))
    height, width = size[0], int(size[1] * 1.5)
    yy = np.linspace(0, 1, height)[:, None]
    horizon = rng.uniform(0.35, 0.6)
    ground = 1 / (1 + np.exp(-(yy - horizon) * 30))
    if modality == Modality.VISIBLE:
        wall = rng.uniform(100, 170) + rng.uniform(-20, 20, 3)
        floor = rng.uniform(80, 150) + rng.uniform(-12, 12, 3)
        scene = (wall * (1 - ground) + floor * ground)[:, None, :] * np.ones((1, width, 1))
        for _ in range(int(rng.integers(3, 7))):
            x0, y0 = rng.integers(0, width), rng.integers(0, int(height * horizon))
            w, h = rng.integers(width // 8, width // 3), rng.integers(height // 10, height // 3)
            scene[y0 : y0 + h, x0 : x0 + w] = wall + rng.uniform(-40, 40, 3)
        scene += _smooth_noise(rng, (height, width), 6, 8)[..., None]
    else:
        cold, warm_ground = rng.uniform(20, 55), rng.uniform(5, 25)
        scene = (cold + warm_ground * ground) * np.ones((1, width))
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            w, h = rng.integers(3, width // 5), rng.integers(3, height // 5)
            scene[y0 : y0 + h, x0 : x0 + w] = rng.uniform(80, 150)
        scene += _smooth_noise(rng, (height, width), 5, 8)
    return np.clip(scene, 0, 255).astype(np.float32)


@dataclass(frozen=True)
class Look:
    """Viewing conditions of one tracklet in one modality (constant over its frames)."""

    offset: int
    gain: np.float32
    gain_cast: np.ndarray
    shade: np.ndarray
    offset_ir: np.float32
    columns: np.ndarray
    noise: np.ndarray


def make_look(
    rng: np.random.Generator,
    column_rng: np.random.Generator,
    modality: Modality,
    size: tuple[int, int],
) -> Look:
    """Background crop, illumination, IR gain/offset, column noise and a sensor-noise bank."""
    width = size[1]
    light = rng.uniform(-0.2, 0.2)
    gain = rng.uniform(0.7, 1.2) if modality == Modality.VISIBLE else rng.uniform(0.9, 1.1)
    channels, sigma = (3, 3.0) if modality == Modality.VISIBLE else (1, 5.0)
    bank = rng.standard_normal(
        (size[0] + NOISE_MARGIN, width + NOISE_MARGIN, channels), dtype=np.float32
    )
    return Look(
        offset=int(rng.integers(0, int(width * 1.5) - width + 1)),
        gain=np.float32(gain),
        gain_cast=(gain * rng.uniform(0.92, 1.08, 3)).astype(np.float32),
        shade=(1.0 + light * np.linspace(-1, 1, width)).astype(np.float32),
        offset_ir=np.float32(rng.uniform(-8, 8)),
        columns=column_rng.normal(0, 3, width).astype(np.float32),
        noise=bank[..., 0] * sigma if channels == 1 else bank * sigma,
    )


def _noise(bank: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Sensor noise for one frame: a random window of the tracklet's noise bank (cheap to draw)."""
    dy, dx = rng.integers(0, NOISE_MARGIN + 1, 2)
    return bank[dy : dy + shape[0], dx : dx + shape[1]]


def colourise(
    parts: np.ndarray,
    ident: Identity,
    modality: Modality,
    background: np.ndarray,
    look: Look,
    rng: np.random.Generator,
) -> np.ndarray:
    """Turn a part map into a uint8 [H, W, 3] frame of the given modality."""
    width = parts.shape[1]
    scene = background[:, look.offset : look.offset + width]
    person = parts != BG
    if modality == Modality.VISIBLE:
        colours = ident.visible[parts] * look.shade[None, :, None]
        image = np.where(person[..., None], colours, scene) * look.gain_cast
        image += _noise(look.noise, parts.shape, rng)
        frame = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        return np.asarray(frame.filter(ImageFilter.GaussianBlur(0.5)))
    thermal = np.where(person, ident.infrared[parts], scene) * look.gain + look.offset_ir
    thermal += look.columns[None, :] + _noise(look.noise, parts.shape, rng)
    frame = Image.fromarray(np.clip(thermal, 0, 255).astype(np.uint8))
    return np.repeat(np.asarray(frame.filter(ImageFilter.GaussianBlur(1.0)))[..., None], 3, axis=2)
