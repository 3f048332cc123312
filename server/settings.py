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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

ENV_PREFIX = "VVIREID_"


class SettingsError(ValueError):
    """Settings cannot be used; the message names the field (and its environment variable)."""


class ServerSettings(BaseModel):
    """Everything the query server can be told. Field ``x`` is read from ``VVIREID_X``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path | None = Field(None, description="model checkpoint (.safetensors)")
    index: Path | None = Field(None, description="gallery index folder (from vvireid-index build)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    api_key: SecretStr | None = Field(None, description="key for the gallery write endpoints")
    api_key_file: Path | None = Field(None, description="file holding the API key (first line)")
    max_frames: int = Field(64, ge=1, le=1000, description="frames per request")
    max_top_k: int = Field(1000, ge=1, description="largest top_k a query may ask for")
    default_top_k: int = Field(10, ge=1)
    max_batch: int = Field(16, ge=1, description="tracklets per model call")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill up")
    queue_size: int = Field(64, ge=1, description="queued tracklets before answering 503")
    worker_threads: int = Field(
        32, ge=1, description="request threads (decode + preprocess run there, in parallel)"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body limit")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="pixels per frame (w * h)")
    request_timeout_s: float = Field(60.0, gt=0, description="longest wait for the model")
    thumbnail_height: int = Field(128, ge=16, description="height of thumbnails of added tracklets")
    log_level: str = "info"

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k {self.default_top_k} > max_top_k {self.max_top_k}")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")
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


def _describe(exc: ValidationError, explicit: set[str]) -> str:
    """One line per bad field, naming where the value came from."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        source = "" if field in explicit or not field else f" (env {ENV_PREFIX}{field.upper()})"
        lines.append(f"{field}{source}: {error['msg']}")
    return "invalid server settings: " + "; ".join(lines)
