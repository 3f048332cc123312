"""Server settings: one validated object built from defaults, ``VVIREID_*`` variables and the CLI.

Why plain pydantic instead of pydantic-settings: the only thing needed is "a field may come from an
environment variable named after it", which is a dozen lines here and one dependency less in the
serving image. Precedence: explicit values (CLI flags, test code) > environment > defaults.
``create_app`` receives a settings object; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from vvireid.indexer.gallery import BackendOptions

ENV_PREFIX = "VVIREID_"
DEFAULT_COLLECTION = "vvireid_gallery"


class SettingsError(ValueError):
    """Settings cannot be used; the message names the field (and its environment variable)."""


class ServerSettings(BaseModel):
    """Everything the query server can be told. Field ``x`` is read from ``VVIREID_X``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path | None = Field(None, description="model checkpoint (.safetensors)")
    index: Path | None = Field(
        None,
        description="gallery index folder (from vvireid-index build); with backend milvus, the "
        "collection name (default vvireid_gallery)",
    )
    backend: Literal["faiss", "milvus"] = Field(
        "faiss", description="faiss: a local index folder; milvus: a Milvus collection"
    )
    milvus_uri: str | None = Field(
        None,
        description="a .db path (Milvus Lite) or http(s)://host:19530; credentials come from "
        "VVIREID_MILVUS_TOKEN(_FILE) or VVIREID_MILVUS_USER + VVIREID_MILVUS_PASSWORD(_FILE)",
    )
    milvus_timeout_s: float = Field(10.0, gt=0, description="Milvus connection timeout")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="port (0 picks a free one)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="the model weights' dtype: auto is bf16 on CUDA, fp32 on the CPU"
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the model over static batch sizes, all compiled at start "
        "(default: on CUDA only)",
    )
    api_key: SecretStr | None = Field(None, description="key for the gallery write endpoints")
    api_key_file: Path | None = Field(None, description="file holding the API key (first line)")
    max_frames: int = Field(64, ge=1, le=1000, description="frames per request")
    max_top_k: int = Field(1000, ge=1, le=100_000, description="largest top_k a query may ask for")
    default_top_k: int = Field(10, ge=1, description="top_k when a query gives none")
    max_batch: int = Field(16, ge=1, description="tracklets per model call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill up")
    max_in_flight: int = Field(
        16, ge=1, description="requests decoding or running the model at once (the rest wait)"
    )
    queue_size: int = Field(
        64, ge=1,
        description="requests that may wait for a slot, and tracklets the batch queue holds; "
        "more get 503 at once",
    )
    admission_timeout_s: float = Field(
        2.0, gt=0, le=60,
        description="longest wait for a slot; a request that cannot start by then gets 503",
    )
    worker_threads: int = Field(
        32, ge=1,
        description="request threads (decode + preprocess run there); at least max_in_flight "
        "+ 4 are used, so cheap routes never wait behind model routes",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body limit")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="pixels per frame (w * h)")
    max_request_pixels: int = Field(
        64 * 1024 * 1024, ge=1,
        description="decoded pixels per request, all frames together (checked from the headers "
        "before any pixel is decoded)",
    )
    request_timeout_s: float = Field(60.0, gt=0, description="longest wait for the model")
    body_timeout_s: float = Field(
        30.0, gt=0, description="longest time to receive a request body (slow senders get 408)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="longest time from connecting to the end of the request headers"
    )
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after")
    thumbnail_height: int = Field(128, ge=16, description="height of thumbnails of added tracklets")
    metrics_key: SecretStr | None = Field(
        None, description="if set, /metrics needs 'Authorization: Bearer KEY'"
    )
    log_level: str = Field("info", description="debug, info, warning or error")
    examples_dir: Path | None = Field(
        None,
        description="folder of example query tracklets the page offers (a subfolder per example: "
        "its frames and example.json); the demo sets it",
    )

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k {self.default_top_k} > max_top_k {self.max_top_k}")
        if self.queue_size < self.max_in_flight:
            raise ValueError(
                f"queue_size {self.queue_size} < max_in_flight {self.max_in_flight}: admitted "
                "requests could find the batch queue full"
            )
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")
        if self.backend == "milvus" and not self.milvus_uri:
            raise ValueError("backend milvus needs milvus_uri (--milvus-uri / VVIREID_MILVUS_URI)")
        return self

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServerSettings:
        """Build settings from ``VVIREID_*`` variables, then ``overrides`` (None values ignored).

        Raises:
            SettingsError: naming the field and the variable it came from.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw.strip() != "":
                values[name] = raw.strip()
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, set(overrides))) from None

    def backend_options(self, environ: Mapping[str, str] | None = None) -> BackendOptions:
        """Where the gallery lives, with Milvus credentials read from the environment or files.

        Raises:
            SettingsError: a credential file is unreadable or empty.
        """
        try:
            return BackendOptions.from_env(
                self.backend, self.milvus_uri, timeout_s=self.milvus_timeout_s, environ=environ
            )
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def gallery_location(self) -> Path | str:
        """The index folder (faiss) or collection name (milvus) to open."""
        if self.backend == "milvus":
            return str(self.index) if self.index is not None else DEFAULT_COLLECTION
        if self.index is None:
            raise SettingsError("index: give --index (or VVIREID_INDEX)")
        return self.index

    @property
    def thread_pool_size(self) -> int:
        """Threads for sync routes: every admitted model request plus a few for cheap routes."""
        return max(self.worker_threads, self.max_in_flight + 4)

    def resolved_api_key(self) -> str | None:
        """The configured API key, reading ``api_key_file`` if given (None = writes disabled).

        Raises:
            SettingsError: the key file is missing, unreadable or empty.
        """
        if self.api_key is not None:
            key = self.api_key.get_secret_value().strip()
            if not key:
                raise SettingsError("api_key: is empty")
            return key
        if self.api_key_file is None:
            return None
        try:
            lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(
                f"api_key_file: cannot read {self.api_key_file} ({exc.strerror or exc})"
            ) from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise SettingsError(f"api_key_file: {self.api_key_file} is empty")
        return key


def default_of(name: str) -> Any:
    """The default of a settings field, for help texts that must not repeat the number."""
    return ServerSettings.model_fields[name].default


def help_of(name: str) -> str:
    """A field's description plus its default and variable: the CLI's help text for it."""
    field = ServerSettings.model_fields[name]
    default = "" if field.default is None else f"; default {field.default}"
    return f"{field.description or name}{default} [{ENV_PREFIX}{name.upper()}]"


def _describe(exc: ValidationError, explicit: set[str]) -> str:
    """One line per bad field, naming where the value came from."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        named = field in explicit or field not in ServerSettings.model_fields
        source = "" if named else f" (env {ENV_PREFIX}{field.upper()})"
        lines.append(f"{field}{source}: {error['msg']}")
    return "invalid server settings: " + "; ".join(lines)
