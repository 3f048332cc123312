"""The embedded demo: synthetic VVI data -> model -> evaluate -> index -> serve, on CPU.

Run with ``make demo`` (or ``.venv/bin/python -m scripts.demo``). Every step writes under
``.demo/`` (``VVIREID_DEMO_DIR``) and is skipped when its output already exists, so a re-run
reuses the dataset, the model and the index and goes straight to serving.

The model is the one shipped in ``scripts/demo_model/``: the ``demo`` recipe trained once by the
project's own trainer on 1,000 *other* synthetic identities (seed 1; the command is in
``scripts/demo_model/recorded.json`` and docs/benchmarks.md). Why not train in front of the user:
a cross-modal feature that transfers needs many identities, and generating and learning them takes
about 20 minutes on one core, far beyond the demo's few minutes; 100 identities in 70 s gave
R1 ~8%. The demo's own 100 test identities (seed 0) were never seen by it. The summary shows the
shipped model next to the same network untrained (random init) and to chance.

The screen shows one line per step (and the indexing progress), then one box once the server
answers: the page URL (the real port), a ``curl`` query that works as pasted, and the held-out
metrics next to the untrained network and chance. The page offers example queries (held-out
query clips copied to ``.demo/examples``, served through ``examples_dir``). Everything else
(every log record with timestamps, the JSON the commands print) goes to ``.demo/demo.log`` and
``.demo/logs/``.

Environment: ``VVIREID_DEMO_DIR`` (default ``.demo``), ``VVIREID_HOST`` (127.0.0.1),
``VVIREID_PORT`` (8000; ``0`` picks a free port), ``VVIREID_DEMO_SERVE`` (``0`` stops after
indexing).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vvireid.indexer.sources import DatasetSplits

log = logging.getLogger("vvireid.demo")

DATASET_FORMAT = "hitsz-vcm"
DEMO_IDS = 200
DEMO_CAMERAS = 4
RECIPE = "demo"
SHIPPED_DIR = Path(__file__).resolve().parent / "demo_model"
SHIPPED_MODEL = SHIPPED_DIR / "model.safetensors"
UNTRAINED_SEED = 0
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
EXIT_PORT_TAKEN = 2
EXIT_INTERRUPTED = 130
QUERY_FRAMES = 6
EXAMPLES_PER_DIRECTION = 3
RULE = "=" * 78


class DemoError(RuntimeError):
    """A step failed; the message says which and where its details are."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _step(title: str) -> None:
    log.info("== %s", title)


def _screen_filter(record: logging.LogRecord) -> bool:
    """The screen gets the demo's own lines and warnings/errors from anywhere, nothing else."""
    return record.name == log.name or record.levelno >= logging.WARNING


def configure_logging(root_dir: Path) -> None:
    """One screen handler (short lines) and one file handler (everything, timestamped).

    Why the demo installs them before anything else: the training CLI adds its own stderr handler
    only when none exists, so every record reaches the screen once.
    """
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    screen = logging.StreamHandler(sys.stderr)
    screen.setFormatter(logging.Formatter("%(message)s"))
    screen.addFilter(_screen_filter)
    root.addHandler(screen)
    root_dir.mkdir(parents=True, exist_ok=True)
    detail = logging.FileHandler(root_dir / "demo.log", encoding="utf-8")
    detail.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(detail)
    # faiss's loader logs each instruction set it tries (a ModuleNotFoundError for
    # swigfaiss_avx512 on most CPUs) at INFO: not news for anyone running the demo.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _run_command(name: str, main: Callable[[list[str]], int], argv: list[str], logs: Path) -> None:
    """Run a vvireid CLI in-process; the JSON it prints goes to ``logs/<name>.json``."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.json", "w", encoding="utf-8") as out, \
            contextlib.redirect_stdout(out):
        status = main(argv)
    if status == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    if status != 0:
        raise DemoError(f"{name} failed (exit {status}); see the messages above and {logs.parent}"
                        "/demo.log")


def make_dataset(data: Path) -> None:
    """Synthetic HITSZ-VCM-format dataset: half the identities train, the other half test."""
    if (data / "info" / "track_test_info.txt").is_file():
        log.info("dataset exists: %s", data)
        return
    from vvireid.training.data.synth import synthesize

    _step(f"generating a synthetic {DATASET_FORMAT} dataset ({DEMO_IDS} identities) in {data}")
    partial = data.with_name(data.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    synthesize(partial, DATASET_FORMAT, ids=DEMO_IDS, cameras=DEMO_CAMERAS, seed=0)
    partial.rename(data)


def install_model(run: Path, shipped: Path = SHIPPED_MODEL) -> Path:
    """Put the shipped demo model (see the module docstring) in the run folder, once."""
    import shutil

    from vvireid.model.checkpoint import read_checkpoint_metadata
    from vvireid.model.fileio import write_text_atomic

    checkpoint = run / "model.safetensors"
    if checkpoint.is_file() and (run / "DONE").is_file():
        log.info("model exists: %s", checkpoint)
        return checkpoint
    if not shipped.is_file():
        raise DemoError(f"the shipped demo model {shipped} is missing; restore it with "
                        f"`git checkout -- {shipped.name}` in {shipped.parent}")
    meta = read_checkpoint_metadata(shipped)
    _step(f"using the '{RECIPE}' model trained offline on {meta['config'].get('num_classes', '?')} "
          f"other synthetic identities ({_shown_path(shipped)})")
    run.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped, checkpoint)
    write_text_atomic(run / "DONE", "ok\n")
    return checkpoint


def drop_stale_outputs(root: Path, shipped: Path = SHIPPED_MODEL) -> None:
    """A ``.demo`` made by an older version holds another model (before issue 17 the demo trained
    its own): remove it and what was computed from it, so the demo never shows stale figures."""
    import shutil

    from vvireid.model.fileio import sha256_file

    current = root / "run" / "model.safetensors"
    if not current.is_file() or not shipped.is_file():
        return
    if sha256_file(current) == sha256_file(shipped):
        return
    log.info("replacing the model of an older demo in %s (and its evaluation and index)", root)
    for name in ("run", "eval", "index"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / "index.built").unlink(missing_ok=True)


def untrained_model(checkpoint: Path, out: Path) -> Path:
    """The same network with random weights (seeded): the baseline the summary compares against."""
    import torch
    from vvireid.model.checkpoint import read_checkpoint_metadata, save_checkpoint
    from vvireid.model.config import ModelConfig
    from vvireid.model.factory import build_model

    path = out / "model.safetensors"
    if path.is_file():
        return path
    config = ModelConfig.from_dict(read_checkpoint_metadata(checkpoint)["config"])
    torch.manual_seed(UNTRAINED_SEED)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, build_model(config).eval(), {"untrained": True})
    return path


def evaluate(checkpoint: Path, data: Path, out: Path, logs: Path,
             what: str = "the model") -> dict[str, Any]:
    """Cross-modal evaluation on the held-out identities, both directions."""
    from vvireid.training.cli import main as train_main

    report_path = out / "report.json"
    if not report_path.is_file():
        _step(f"evaluating {what} on the held-out identities (ir_to_vis and vis_to_ir)")
        argv = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(data),
                "--dataset", DATASET_FORMAT, "--out", str(out)]
        _run_command(out.name, train_main, argv, logs)
    return json.loads(report_path.read_text())


def build_index(checkpoint: Path, data: Path, index: Path, logs: Path) -> None:
    """Encode every test tracklet (both modalities) into a FAISS gallery index."""
    import shutil

    from vvireid.indexer.cli import main as index_main
    from vvireid.model.fileio import write_text_atomic

    built = index.with_name(index.name + ".built")  # beside it: the index folder is the store's
    if built.is_file() and index.is_dir():
        log.info("index exists: %s", index)
        return
    shutil.rmtree(index, ignore_errors=True)  # an interrupted build: start it again
    _step(f"indexing the test tracklets into {index}")
    argv = ["build", "--checkpoint", str(checkpoint), "--gallery", str(data),
            "--format", DATASET_FORMAT, "--split", "test", "--out", str(index)]
    _run_command("index", index_main, argv, logs)
    write_text_atomic(built, "ok\n")


def load_splits(data: Path) -> DatasetSplits:
    """The demo dataset's splits, read once and shared by the chance figure and the example query."""
    from vvireid.indexer.sources import load_dataset

    return load_dataset(DATASET_FORMAT, data)


def example_query(splits: DatasetSplits) -> tuple[list[Path], int]:
    """Frames of one infrared test tracklet (the default ir_to_vis query) and its pid."""
    query = splits.query["ir_to_vis"][0]
    return [Path(f) for f in query.frames[:QUERY_FRAMES]], int(query.pid)


def write_examples(splits: DatasetSplits, folder: Path) -> Path:
    """Copy the first query tracklets of each direction (distinct people) for the page's
    "try an example" buttons; the server lists them from ``examples_dir``. Not chosen by result:
    the first ones the dataset lists, so the page shows hits and misses as the metrics say.
    """
    import shutil

    from vvireid.model.fileio import write_text_atomic

    if (folder / "DONE").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for direction, queries in splits.query.items():
        seen: set[int] = set()
        for query in queries:
            if len(seen) == EXAMPLES_PER_DIRECTION:
                break
            if query.pid in seen:
                continue
            seen.add(int(query.pid))
            label = f"{query.modality.label} clip of person {query.pid}"
            target = partial / f"{direction}-{int(query.pid):04d}"
            target.mkdir(parents=True)
            for i, frame in enumerate(query.frames[:QUERY_FRAMES]):
                shutil.copyfile(frame, target / f"{i:02d}{Path(frame).suffix}")
            meta = {"modality": query.modality.label, "pid": int(query.pid),
                    "camid": int(query.camid), "label": label}
            write_text_atomic(target / "example.json", json.dumps(meta) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    write_text_atomic(folder / "DONE", "ok\n")
    return folder


def chance_r1(splits: DatasetSplits) -> dict[str, float]:
    """Expected R1 of a random ranking per direction: mean share of positives in the gallery."""
    chance = {}
    for direction, queries in splits.query.items():
        gallery = splits.gallery[direction]
        shares = [
            sum(g.pid == q.pid and g.camid != q.camid for g in gallery) / len(gallery)
            for q in queries
        ]
        chance[direction] = 100 * sum(shares) / max(len(shares), 1)
    return chance


def metric_lines(
    report: dict[str, Any], chance: dict[str, float], untrained: dict[str, Any] | None = None
) -> list[str]:
    """One line per direction: R1 and mAP (percent) next to the untrained network and chance."""
    lines = []
    for direction, metrics in report["directions"].items():
        base = (untrained or {}).get("directions", {}).get(direction)
        versus = f"untrained R1 {base['R1']:.1f}%, " if base else ""
        lines.append(
            f"{direction:<10} R1 {metrics['R1']:5.1f}%  mAP {metrics['mAP']:5.1f}%   "
            f"({versus}chance R1 about {chance.get(direction, 0.0):.1f}%)"
        )
    return lines


def _shown_path(path: Path) -> str:
    """A path as short as possible for the current folder (the curl line is pasted there)."""
    absolute = path.resolve()
    with contextlib.suppress(ValueError):
        return str(absolute.relative_to(Path.cwd().resolve()))
    return str(absolute)


def curl_line(frames: list[Path], url: str) -> str:
    parts = " ".join(f"-F frames=@{shlex.quote(_shown_path(f))}" for f in frames)
    return f"curl -s -F modality=infrared -F top_k=5 {parts} {url}/query"


def final_box(url: str, frames: list[Path], pid: int, metrics: list[str]) -> str:
    """The one screen a newcomer needs: where to look, what to paste, how good it is."""
    lines = [
        RULE,
        f"vvireid demo is serving: {url}/   (API docs: {url}/docs; Ctrl-C stops it)",
        "",
        "held-out identities (never seen in training), cross-modal:",
        *(f"  {line}" for line in metrics),
        "",
        f"query with an infrared clip of person {pid}; the answer ranks visible tracklets:",
        curl_line(frames, url),
        RULE,
    ]
    return "\n".join(lines)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind the server's socket now, before minutes of work, so a taken port fails fast.

    Port 0 asks the kernel for a free port; the socket then knows the real one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DemoError(
                f"port {port} on {host} is already in use (another server?). Pick another port: "
                f"VVIREID_PORT={port + 1} make demo, or VVIREID_PORT=0 make demo for any free one",
                EXIT_PORT_TAKEN,
            ) from None
        raise DemoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _listen_settings() -> tuple[str, int]:
    host = os.environ.get("VVIREID_HOST", "").strip() or DEFAULT_HOST
    raw = os.environ.get("VVIREID_PORT", "").strip() or str(DEFAULT_PORT)
    try:
        port = int(raw)
    except ValueError:
        raise DemoError(f"VVIREID_PORT={raw!r}: expected a port number (0 picks a free one)") \
            from None
    if not 0 <= port <= 65535:
        raise DemoError(f"VVIREID_PORT={port}: expected 0..65535 (0 picks a free one)")
    return host, port


def _announce_when_ready(app: Any, server: Any, box: str) -> None:
    """Print the box once the model and index are loaded (or stop the server if they fail)."""
    while not server.should_exit:
        if app.state.engine is not None:
            sys.stderr.write(box + "\n")
            sys.stderr.flush()
            return
        if app.state.load_error is not None:
            log.error("the server could not load the model or index: %s", app.state.load_error)
            server.should_exit = True
            return
        time.sleep(0.1)


def serve(checkpoint: Path, index: Path, sock: socket.socket, box: Callable[[str], str],
          examples: Path | None = None) -> int:
    """Serve on the reserved socket until Ctrl-C; the box is printed when the server is ready."""
    import uvicorn
    from vvireid.server.app import create_app
    from vvireid.server.settings import ServerSettings

    host, port = sock.getsockname()[:2]
    settings = ServerSettings.from_env(checkpoint=checkpoint, index=index, host=host, port=port,
                                       examples_dir=examples)
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    _step(f"starting the server on {url} (loading the model and the index)")
    threading.Thread(target=_announce_when_ready, args=(app, server, box(url)),
                     name="vvireid-demo-ready", daemon=True).start()
    server.run(sockets=[sock])
    return 1 if app.state.load_error is not None else 0


def run(root: Path) -> int:
    data, run_dir, index, logs = root / "data", root / "run", root / "index", root / "logs"
    serving = os.environ.get("VVIREID_DEMO_SERVE", "1") != "0"
    sock = reserve_port(*_listen_settings()) if serving else None
    try:
        make_dataset(data)
        drop_stale_outputs(root)
        checkpoint = install_model(run_dir)
        splits = load_splits(data)
        report = evaluate(checkpoint, data, root / "eval", logs)
        untrained = evaluate(untrained_model(checkpoint, root / "untrained"), data,
                             root / "eval-untrained", logs, "the untrained network")
        metrics = metric_lines(report, chance_r1(splits), untrained)
        build_index(checkpoint, data, index, logs)
        if sock is None:
            for line in metrics:
                log.info("%s", line)
            return 0
        frames, pid = example_query(splits)
        examples = write_examples(splits, root / "examples")
        try:
            return serve(checkpoint, index, sock, lambda url: final_box(url, frames, pid, metrics),
                         examples)
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a normal stop
            sys.stderr.write("\nserver stopped (`make demo` serves again without redoing the work)\n")
            return 0
    finally:
        if sock is not None:
            sock.close()


def main() -> int:
    root = Path(os.environ.get("VVIREID_DEMO_DIR", ".demo"))
    configure_logging(root)
    try:
        return run(root)
    except KeyboardInterrupt:
        sys.stderr.write("\ndemo stopped (re-run `make demo` to continue where it left off)\n")
        return EXIT_INTERRUPTED
    except DemoError as exc:
        sys.stderr.write(f"demo: {exc}\n")
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
