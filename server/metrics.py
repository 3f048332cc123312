"""A small Prometheus text-format registry: counters, gauges and histograms with labels.

Why not prometheus_client: the server needs five metric families and one exposition function;
writing them is shorter than pinning another dependency in the serving image. The output follows
the text exposition format 0.0.4 (``# HELP``/``# TYPE`` lines, ``_bucket{le=...}``/``_sum``/
``_count`` for histograms). All updates take one lock, so request threads, the batch worker and
the event loop can record concurrently.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str], lock: threading.Lock):
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = lock

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]  # an unlabelled counter exists from the start, at 0
        lines = self.header()
        lines += [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]
        return lines


class Gauge(_Family):
    """A value that goes up and down; ``set_function`` samples it at scrape time instead."""

    kind = "gauge"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._values: dict[LabelValues, float] = {}
        self._function: Callable[[], float] | None = None

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from ``function`` on every scrape (unlabelled gauges only)."""
        if self.labelnames:
            raise ValueError(f"{self.name}: set_function needs an unlabelled gauge")
        self._function = function

    def render(self) -> list[str]:
        lines = self.header()
        if self._function is not None:
            return [*lines, f"{self.name} {_number(self._function())}"]
        with self._lock:
            items = sorted(self._values.items())
        return lines + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Histogram(_Family):
    """Cumulative buckets, sum and count per label set."""

    kind = "histogram"

    def __init__(self, *args, buckets: Sequence[float] = LATENCY_BUCKETS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        slot = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[slot] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), []))

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        lines = self.header()
        for key, counts, total in items:
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return lines


class Registry:
    """The metric families of one app (one per ``create_app``, so tests do not share counts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: list[_Family] = []

    def counter(self, name: str, help_text: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, tuple(labelnames), self._lock))

    def gauge(self, name: str, help_text: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, tuple(labelnames), self._lock))

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Iterable[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(name, help_text, tuple(labelnames), self._lock, buckets=buckets))

    def _add(self, family):
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} registered twice")
        self._families.append(family)
        return family

    def render(self) -> str:
        """The whole registry in the Prometheus text format."""
        lines: list[str] = []
        for family in self._families:
            lines += family.render()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The server's metric families, by name."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.requests = r.counter(
            "vvireid_http_requests_total", "HTTP requests by route, method and status.",
            ("route", "method", "status"),
        )
        self.latency = r.histogram(
            "vvireid_http_request_duration_seconds", "Time from request start to response end.",
            ("route",),
        )
        self.stage = r.histogram(
            "vvireid_stage_duration_seconds",
            "Time per query stage (decode in the request thread, encode and search per batch).",
            ("stage",),
        )
        self.batch_size = r.histogram(
            "vvireid_batch_size", "Tracklets per model call of the micro-batcher.", (),
            buckets=BATCH_BUCKETS,
        )
        self.queue_depth = r.gauge("vvireid_queue_depth", "Tracklets waiting for the model.")
        self.rejected = r.counter(
            "vvireid_queue_rejected_total", "Requests answered 503 because the queue was full."
        )
        self.gallery_size = r.gauge("vvireid_gallery_tracklets", "Tracklets in the gallery index.")
        self.ready = r.gauge("vvireid_ready", "1 once the model and the index are loaded.")

    def render(self) -> str:
        return self.registry.render()
