"""``vvireid-serve``: serve a checkpoint and its gallery index over HTTP.

Flags override ``VVIREID_*`` environment variables, which override the defaults. Exit codes:
0 after a clean shutdown, 1 when the model or index cannot be loaded (or the port is taken),
2 for bad settings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from vvireid.server.settings import default_of, help_of

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vvireid-serve",
        description="Serve a vvireid model and its gallery index: web page at /, API at /docs.",
        epilog="Every flag can also be set as an environment variable VVIREID_<FLAG>, e.g. "
        "VVIREID_CHECKPOINT, VVIREID_INDEX, VVIREID_API_KEY_FILE, VVIREID_MAX_BATCH.",
    )
    add = parser.add_argument
    add("--version", action="version",
        version=f"%(prog)s {importlib.metadata.version('vvireid')}",
        help="print the installed vvireid version and exit")
    add("--checkpoint", type=Path, help=help_of("checkpoint"))
    add("--index", type=Path, help=help_of("index"))
    add("--backend", choices=("faiss", "milvus"), help=help_of("backend"))
    add("--milvus-uri", help=help_of("milvus_uri"))
    add("--milvus-timeout-s", type=float, help=help_of("milvus_timeout_s"))
    add("--host", help=help_of("host"))
    add("--port", type=int, help=help_of("port"))
    add("--device", help=help_of("device"))
    add("--dtype", choices=("auto", "fp32", "bf16", "fp16"), help=help_of("dtype"))
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help=help_of("compile"))
    add("--api-key-file", type=Path, help=help_of("api_key_file"))
    add("--max-frames", type=int, help=help_of("max_frames"))
    add("--max-top-k", type=int, help=help_of("max_top_k"))
    add("--max-batch", type=int, help=help_of("max_batch"))
    add("--max-wait-ms", type=float, help=help_of("max_wait_ms"))
    add("--max-in-flight", type=int, help=help_of("max_in_flight"))
    add("--queue-size", type=int, help=help_of("queue_size"))
    add("--admission-timeout-s", type=float, help=help_of("admission_timeout_s"))
    add("--worker-threads", dest="worker_threads", type=int,
        help=help_of("worker_threads"))
    add("--torch-threads", type=int, help=help_of("torch_threads"))
    add("--max-request-mb", type=float,
        help=f"request body limit in MiB; default "
        f"{default_of('max_request_bytes') / 1024 / 1024:g} [VVIREID_MAX_REQUEST_BYTES, in bytes]")
    add("--max-request-pixels", type=int, help=help_of("max_request_pixels"))
    add("--body-timeout-s", type=float, help=help_of("body_timeout_s"))
    add("--header-timeout-s", type=float, help=help_of("header_timeout_s"))
    add("--log-level", choices=("debug", "info", "warning", "error"), help=help_of("log_level"))
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    values = {k: v for k, v in vars(args).items() if v is not None and k != "max_request_mb"}
    if args.max_request_mb is not None:
        values["max_request_bytes"] = int(args.max_request_mb * 1024 * 1024)
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; returns the process exit code."""
    import uvicorn
    from vvireid.server.app import create_app, uvicorn_config
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
    server = uvicorn.Server(uvicorn_config(app, settings))
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
    if settings.checkpoint is None or (settings.index is None and settings.backend == "faiss"):
        return "give --checkpoint and --index (or VVIREID_CHECKPOINT and VVIREID_INDEX)"
    if not settings.checkpoint.is_file():
        return f"checkpoint {settings.checkpoint}: no such file"
    if settings.backend == "milvus":
        return None  # a collection, checked (and its server reached) when the engine loads
    if not settings.index.is_dir():
        return f"index {settings.index}: no such folder (build one with vvireid-index build)"
    return None
