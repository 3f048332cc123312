"""Settings from the environment and the ``vvireid-serve`` command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_support import TinyGallery
from vvireid.server.cli import build_parser, main
from vvireid.server.settings import ServerSettings, SettingsError

REPO = Path(__file__).resolve().parents[2]


def test_settings_read_prefixed_environment_variables(tmp_path):
    env = {"VVIREID_CHECKPOINT": "/m/model.safetensors", "VVIREID_INDEX": "/idx",
           "VVIREID_MAX_BATCH": "8", "VVIREID_MAX_WAIT_MS": "2.5", "VVIREID_PORT": "9000",
           "VVIREID_UNRELATED": "ignored", "MAX_BATCH": "99"}
    settings = ServerSettings.from_env(env)
    assert settings.checkpoint == Path("/m/model.safetensors") and settings.index == Path("/idx")
    assert (settings.max_batch, settings.max_wait_ms, settings.port) == (8, 2.5, 9000)
    assert settings.max_frames == 64  # default
    # Explicit values (CLI flags) win over the environment; None means "not given".
    assert ServerSettings.from_env(env, max_batch=4, port=None).max_batch == 4


def test_bad_environment_value_names_the_variable():
    with pytest.raises(SettingsError, match="max_batch .env VVIREID_MAX_BATCH."):
        ServerSettings.from_env({"VVIREID_MAX_BATCH": "lots"})
    with pytest.raises(SettingsError, match="queue_size"):
        ServerSettings.from_env({}, queue_size=0)


def test_api_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("abc123\nsecond line ignored\n")
    assert ServerSettings(api_key_file=key).resolved_api_key() == "abc123"
    assert ServerSettings().resolved_api_key() is None
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        ServerSettings(api_key_file=empty).resolved_api_key()
    with pytest.raises(SettingsError, match="cannot read"):
        ServerSettings(api_key_file=tmp_path / "missing").resolved_api_key()


def test_cli_flags_map_to_settings():
    args = build_parser().parse_args(
        ["--checkpoint", "c.safetensors", "--index", "idx", "--max-frames", "32",
         "--worker-threads", "12", "--max-wait-ms", "1.5", "--max-request-mb", "2"]
    )
    from vvireid.server.cli import _overrides

    settings = ServerSettings.from_env({}, **_overrides(args))
    assert settings.max_frames == 32 and settings.worker_threads == 12
    assert settings.max_wait_ms == 1.5 and settings.max_request_bytes == 2 * 1024 * 1024


def test_cli_refuses_missing_paths(tmp_path, capsys, monkeypatch):
    for name in list(os.environ):
        if name.startswith("VVIREID_"):
            monkeypatch.delenv(name)
    assert main([]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    code = main(["--checkpoint", str(tmp_path / "nope.safetensors"), "--index", str(tmp_path)])
    assert code == 2 and "nope.safetensors: no such file" in capsys.readouterr().err


def test_cli_exits_non_zero_when_the_model_cannot_load(tmp_path, capsys, tiny_gallery):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    code = main(["--checkpoint", str(broken), "--index", str(tiny_gallery.index),
                 "--port", "0", "--device", "cpu"])
    assert code == 1
    assert "broken.safetensors" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_console_script_serves_and_stops_cleanly(tiny_gallery: TinyGallery):
    port = free_port()
    env = {**os.environ, "VVIREID_CHECKPOINT": str(tiny_gallery.checkpoint),
           "VVIREID_INDEX": str(tiny_gallery.index), "VVIREID_TORCH_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vvireid.server", "--port", str(port), "--device", "cpu"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, process.stdout.read() if process.poll() is not None else "timeout"
        probe = next(iter(tiny_gallery.tracklets.values()))
        response = httpx.post(f"http://127.0.0.1:{port}/query", files=probe.files(),
                              data={"modality": probe.modality.label}, timeout=30)
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    # uvicorn finishes the graceful shutdown, then re-raises SIGTERM so supervisors see it.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "loaded baseline model" in output and "id=" in output  # startup and access log lines


def test_limits_have_one_source_the_settings_model():
    """The CLI help shows each limit's default as ServerSettings declares it, and QueryEngine
    has no defaults of its own: it takes the settings object."""
    import inspect

    from vvireid.server.service import QueryEngine

    text = " ".join(build_parser().format_help().split())
    for name in ("max_frames", "max_top_k", "max_batch", "max_in_flight", "queue_size",
                 "admission_timeout_s", "max_request_pixels", "body_timeout_s"):
        default = ServerSettings.model_fields[name].default
        flag = "--" + name.replace("_", "-")
        assert flag in text and f"default {default} [VVIREID_{name.upper()}]" in text, name
    parameters = inspect.signature(QueryEngine.__init__).parameters
    assert set(parameters) == {"self", "model", "encoder", "index", "settings", "on_batch"}


@pytest.mark.parametrize(
    ("values", "named"),
    [({"queue_size": 4, "max_in_flight": 8}, "queue_size 4 < max_in_flight 8"),
     ({"admission_timeout_s": 0}, "admission_timeout_s")],
)
def test_admission_settings_must_agree(values, named):
    with pytest.raises(SettingsError, match=named):
        ServerSettings.from_env({}, **values)
