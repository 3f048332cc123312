"""Training configuration: frozen dataclasses are the schema, YAML files in ``configs/`` are instances.

``load_config("vld_hitsz_vcm", ["optim.lr=1e-5"])`` reads a recipe by name (or a path), applies
``--set`` overrides (dotted key paths, values parsed as YAML), and builds the dataclasses strictly:
an unknown key is an error naming its full path and the closest known key, because a silently
ignored typo (``data.seqlen``) is the most expensive kind of config bug: a whole run with the
default value.

Values that both the model and the data need (``seq_len``, ``image_size``) live in ``model`` only;
the data pipeline reads them from there. ``num_classes`` and ``num_cameras`` are never configured:
they come from the dataset.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from vvireid.model.config import model_default

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "warmup_multistep", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
ON_BAD_FRAME = ("fail", "skip")


class ConfigError(ValueError):
    """A configuration cannot be used; the message names the key path (and a suggestion)."""


@dataclass(frozen=True)
class ModelSection:
    """What to build: the ``vvireid.model.config.ModelConfig`` fields except the dataset-derived ones.

    Their defaults are read from ``ModelConfig``, which owns them.

    ``pretrained`` is a CLIP weights file or open_clip tag (``--pretrained`` on the command line
    wins); None trains from random initialisation (tests, smoke runs).
    """

    method: str = "vld"
    backbone: str = model_default("backbone")
    image_size: tuple[int, int] = model_default("image_size")
    seq_len: int = model_default("seq_len")
    pretrained: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSection:
    """How batches are drawn and decoded.

    A batch holds ``ids_per_batch`` identities x ``tracklets_per_id`` tracklets per modality
    (visible then infrared). ``sampler`` (``vvireid.training.data.samplers.build_sampler``):
    ``identity`` draws a person's visible and infrared tracklets independently (VCM; X-ReID on
    BUPTCampus); ``camera_pairs`` draws aligned visible/infrared twins from distinct cameras (VLD
    on BUPTCampus), and then ``tracklets_per_id`` counts cameras. ``test_sampling`` None means the
    dataset's official test rule. ``pair_flip`` adds VLD's BUPTCampus tracklet-level flip shared by
    an aligned pair. ``on_bad_frame``: ``fail`` stops on an unreadable frame, ``skip`` substitutes a
    neighbour. ``options`` are the dataset reader's own options, the one place to set them (e.g.
    ``min_seq_len`` for HITSZ-VCM, ``drop_last_rgb_batch`` for BUPTCampus). ``augment_on``: where
    normalisation, erasing and the channel ops run: ``device`` (the workers send uint8 frames and
    a plan of the random decisions, the trainer finishes the batch on its device) or ``worker``
    (float clips from the workers); the tensors are the same either way.
    """

    format: str = "hitsz-vcm"
    ids_per_batch: int = 4
    tracklets_per_id: int = 4
    sampler: str = "identity"
    train_sampling: str = "rrs_train"
    test_sampling: str | None = None
    num_workers: int = 4
    on_bad_frame: str = "fail"
    pair_flip: bool = False
    augment_on: str = "device"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleSection:
    """Epoch-wise learning-rate schedule; the lr is constant within an epoch (both official codes).

    ``cosine`` (VLD, timm ``CosineLRScheduler`` semantics): linear warm-up from
    ``warmup_lr_ratio * lr`` over ``warmup_epochs``, then a cosine from each group's lr down to
    ``min_lr_ratio * lr`` over ``t_initial`` epochs counted from epoch 0 (no shift by the warm-up).
    The floor and the warm-up start are the same absolute value for every group, as in VLD.
    ``warmup_multistep`` (X-ReID ``WarmupMultiStepLR``): factor ``warmup_factor`` rising linearly to 1
    over ``warmup_epochs``, times ``gamma`` per milestone passed (0-based epoch >= milestone).
    """

    name: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr_ratio: float = 0.01
    min_lr_ratio: float = 0.01
    t_initial: int | None = None
    warmup_factor: float = 0.1
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1


@dataclass(frozen=True)
class OptimSection:
    """Optimiser and schedule. Parameter groups and their lr multipliers come from the model.

    ``adamw`` decouples the weight decay (VLD); ``adam`` adds it to the gradient as L2 (X-ReID).
    An "epoch" is ``iters_per_epoch`` iterations, not a pass over the data (both official codes).
    """

    optimizer: str = "adamw"
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    grad_clip: float | None = None
    epochs: int = 24
    iters_per_epoch: int = 200
    schedule: ScheduleSection = field(default_factory=ScheduleSection)


@dataclass(frozen=True)
class EvalSection:
    """Test-set evaluation during and after training.

    ``every`` epochs (0 = only at the end). ``dense`` averages the features of all consecutive
    clips of a tracklet (X-ReID ``eval_all``) instead of the dataset's single-clip rule.
    """

    every: int = 2
    max_rank: int = 20
    dense: bool = False
    batch_size: int = 32


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe. ``loss`` holds the objective's named weights (defaults from the code)."""

    name: str = "unnamed"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: dict[str, float] = field(default_factory=dict)
    augment: str = "vld"
    eval: EvalSection = field(default_factory=EvalSection)
    seed: int = 1
    precision: str = "auto"
    deterministic: bool = True
    log_every: int = 10
    compile: bool = False  # torch.compile the training forward (minutes of compiling first)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists) for YAML/JSON: what ``RUN/config.yaml`` holds."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# loading


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A recipe name (``smoke``, ``vld_bupt``) or a YAML file path -> the file.

    Raises:
        ConfigError: listing the shipped recipes when neither exists.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = available_configs()
    hint = _suggest(str(name_or_path), names)
    raise ConfigError(
        f"config {str(name_or_path)!r}: no such file or shipped recipe{hint} "
        f"(shipped: {', '.join(names)})"
    )


def available_configs() -> list[str]:
    """Names of the recipes shipped in ``training/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe, apply ``key.path=value`` overrides, validate, and return the dataclasses.

    Raises:
        ConfigError: unreadable YAML, unknown keys (with a suggestion), wrong types, bad values.
    """
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    try:
        config = build(TrainConfig, raw, "")
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a config from plain data (e.g. a run's saved ``config.yaml``)."""
    config = build(TrainConfig, data, "")
    validate(config)
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``1e-5``, ``[30, 50]``).

    Unknown keys are not caught here but by the strict build, which names them.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def schema_paths(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every key path of the schema (``model.seq_len``, ``optim.schedule.name``, ...)."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        paths.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            paths += schema_paths(hints[f.name], f"{path}.")
    return paths


def _suggest_elsewhere(key: str, *, exact: bool = False) -> str:
    """The same or a close key in another section: ``data.seqlen`` -> ``model.seq_len``."""
    by_leaf = {p.rsplit(".", 1)[-1]: p for p in schema_paths()}
    if exact:
        return f" (did you mean {by_leaf[key]!r}?)" if key in by_leaf else ""
    close = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.6)
    return f" (did you mean {by_leaf[close[0]]!r}?)" if close else ""


def build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from ``data`` strictly (unknown keys and wrong types are errors)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            path = f"{where}.{key}" if where else str(key)
            hint = (_suggest_elsewhere(str(key), exact=True) or _suggest(str(key), names)
                    or _suggest_elsewhere(str(key)))
            raise ConfigError(f"unknown key {path!r}{hint}")
    values = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Check/convert one value against its type hint (dataclass, tuple, dict, optional, scalar)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if args and args[1] is float:
            return {str(k): _convert(float, v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


# ---------------------------------------------------------------------------------------------
# value checks


def _choice(where: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(known)}{_suggest(value, list(known))}")


def _positive(where: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(config: TrainConfig) -> None:
    """Value checks that types cannot express (choices, ranges, schedule consistency)."""
    from vvireid.model.sampling import TEST_RULES, TRAIN_RULES
    from vvireid.training.data.samplers import SAMPLERS
    from vvireid.training.data.video_dataset import AUGMENT_ON

    optim, sched, data = config.optim, config.optim.schedule, config.data
    _choice("optim.optimizer", optim.optimizer, OPTIMIZERS)
    _choice("optim.schedule.name", sched.name, SCHEDULES)
    _choice("precision", config.precision, PRECISIONS)
    _choice("data.on_bad_frame", data.on_bad_frame, ON_BAD_FRAME)
    _choice("data.augment_on", data.augment_on, AUGMENT_ON)
    _choice("data.train_sampling", data.train_sampling, TRAIN_RULES)
    _choice("data.sampler", data.sampler, SAMPLERS)
    if data.test_sampling is not None:
        _choice("data.test_sampling", data.test_sampling, TEST_RULES)
    for where, value in (("optim.lr", optim.lr), ("optim.epochs", optim.epochs),
                         ("optim.iters_per_epoch", optim.iters_per_epoch),
                         ("data.ids_per_batch", data.ids_per_batch),
                         ("data.tracklets_per_id", data.tracklets_per_id),
                         ("model.seq_len", config.model.seq_len),
                         ("eval.batch_size", config.eval.batch_size),
                         ("eval.max_rank", config.eval.max_rank), ("log_every", config.log_every)):
        _positive(where, value)
    for where, value in (("optim.weight_decay", optim.weight_decay),
                         ("data.num_workers", data.num_workers), ("eval.every", config.eval.every),
                         ("optim.schedule.warmup_epochs", sched.warmup_epochs)):
        _positive(where, value, allow_zero=True)
    if sched.name == "cosine" and sched.t_initial is not None and sched.t_initial < 1:
        raise ConfigError(f"optim.schedule.t_initial: must be >= 1, got {sched.t_initial}")
    if list(sched.milestones) != sorted(sched.milestones):
        raise ConfigError(f"optim.schedule.milestones: must be increasing, got {list(sched.milestones)}")
    for key, weight in config.loss.items():
        if weight < 0:
            raise ConfigError(f"loss.{key}: weights must be >= 0, got {weight}")
