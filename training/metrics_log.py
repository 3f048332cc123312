"""Training metrics: one JSON object per line in ``RUN/metrics.jsonl`` plus TensorBoard scalars.

JSONL is the durable record (greppable, loadable with pandas, survives without TensorBoard);
TensorBoard is the live view. On resume the file is cut back to the records of the epochs that the
checkpoint covers, and TensorBoard purges the steps after it, so a resumed run's logs read like an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from vvireid.model.fileio import write_text_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Append-only metrics writer; a no-op when ``enabled`` is False (non-zero DDP ranks).

    Args:
        run_dir: the run folder.
        enabled: write anything at all.
        resume_epoch: when resuming, the first epoch that will be re-run: records of that epoch and
            later are dropped from ``metrics.jsonl`` and TensorBoard steps from ``resume_step`` on
            are purged.
        resume_step: the global step the resumed run starts at.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        resume_epoch: int | None = None,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._writer = None
        self._handle = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is not None:
            truncate_after(self.path, resume_epoch)
        elif self.path.exists():
            self.path.unlink()
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self._writer = _summary_writer(Path(run_dir) / TENSORBOARD_DIR, resume_step)

    def log(self, kind: str, step: int, values: dict[str, Any], **context: Any) -> None:
        """Write one record: ``{"kind", "step", **context, **values, "time"}``.

        Numeric values also go to TensorBoard as ``kind/name`` at ``step``.
        """
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **context, **values, "time": round(time.time(), 3)}
        self._handle.write(json.dumps(record, default=_jsonable) + "\n")
        self._handle.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._handle is not None:
            self.flush()
            self._handle.close()
            self._handle = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer(folder: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
        log.warning("tensorboard is not importable; only %s is written", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: Path, epoch: int) -> None:
    """Keep only the records of epochs before ``epoch`` (atomically rewritten)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("epoch", -1)) < epoch]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
