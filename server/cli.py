"""``vvireid-serve``: serve a checkpoint and its gallery index over HTTP.

Flags override ``VVIREID_*`` environment variables, which override the defaults. Exit codes:
0 after a clean shutdown, 1 when the model or index cannot be loaded (or the port is taken),
2 for bad settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vvireid-serve",
        description="Serve a vvireid model and its gallery index: web page at /, API at /docs.",
        epilog="Every flag can also be set as an environment variable VVIREID_<FLAG>, e.g. "
        "VVIREID_CHECKPOINT, VVIREID_INDEX, VVIREID_API_KEY_FILE, VVIREID_MAX_BATCH.",
    )
    add = parser.add_argument
    add("--checkpoint", type=Path, help="model checkpoint (.safetensors) [VVIREID_CHECKPOINT]")
    add("--index", type=Path, help="gallery index folder [VVIREID_INDEX]")
    add("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    add("--port", type=int, help="port (default 8000; 0 picks a free one)")
    add("--device", help="auto (default), cpu, cuda or cuda:N")
    add("--api-key-file", type=Path, help="file whose first line is the key for gallery writes")
    add("--max-frames", type=int, help="frames per request (default 64)")
    add("--max-top-k", type=int, help="largest top_k (default 1000)")
    add("--max-batch", type=int, help="tracklets per model call (default 16)")
    add("--max-wait-ms", type=float, help="how long a batch waits to fill up (default 5)")
    add("--queue-size", type=int, help="queued tracklets before answering 503 (default 64)")
    add("--workers-threads", "--worker-threads", dest="worker_threads", type=int,
        help="request threads that decode frames in parallel (default 32)")
    add("--torch-threads", type=int, help="torch CPU threads (default: torch's choice)")
    add("--max-request-mb", type=float, help="request body limit in MiB (default 64)")
    add("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    values = {k: v for k, v in vars(args).items() if v is not None and k != "max_request_mb"}
    if args.max_request_mb is not None:
        values["max_request_bytes"] = int(args.max_request_mb * 1024 * 1024)
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; returns the process exit code."""
    import uvicorn
    from vvireid.server.app import create_app
    from vvireid.server.settings import ServerSettings, SettingsError

    args = build_parser().parse_args(argv)
    try:
        settings = ServerSettings.from_env(**_overrides(args))
    except SettingsError as exc:
        sys.stderr.write(f"vvireid-serve: {exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    problem = _check_paths(settings)
    if problem:
        sys.stderr.write(f"vvireid-serve: {problem}\n")
        return 2
    try:
        app = create_app(settings)
    except SettingsError as exc:
        sys.stderr.write(f"vvireid-serve: {exc}\n")
        return 2
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    failures: list[str] = []

    def on_load_failure(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    app.state.on_load_failure = on_load_failure
    log.info("serving on http://%s:%d (web page at /, API docs at /docs)",
             settings.host, settings.port)
    server.run()
    if failures:
        sys.stderr.write(f"vvireid-serve: could not load the model or index: {failures[0]}\n")
        return 1
    return 0 if server.started else 1


def _check_paths(settings) -> str | None:
    """Fail fast, before binding a port, on paths that cannot work."""
    if settings.checkpoint is None or settings.index is None:
        return "give --checkpoint and --index (or VVIREID_CHECKPOINT and VVIREID_INDEX)"
    if not settings.checkpoint.is_file():
        return f"checkpoint {settings.checkpoint}: no such file"
    if not settings.index.is_dir():
        return f"index {settings.index}: no such folder (build one with vvireid-index build)"
    return None
