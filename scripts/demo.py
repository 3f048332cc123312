"""The embedded demo: synthetic VVI data -> train -> evaluate -> index -> serve, on CPU.

Run with ``make demo`` (or ``.venv/bin/python -m scripts.demo``). Every step writes under
``.demo/`` (``VVIREID_DEMO_DIR``) and is skipped when its output already exists, so a re-run
reuses the dataset, the model and the index and goes straight to serving. An interrupted training
run resumes from its last epoch.

Environment: ``VVIREID_DEMO_DIR`` (default ``.demo``), ``VVIREID_HOST`` (127.0.0.1),
``VVIREID_PORT`` (8000), ``VVIREID_DEMO_SERVE`` (``0`` stops after indexing).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vvireid.indexer.sources import DatasetSplits

log = logging.getLogger("vvireid.demo")

DATASET_FORMAT = "hitsz-vcm"
DEMO_IDS = 200
DEMO_CAMERAS = 4
RECIPE = "demo"


def _step(title: str) -> None:
    log.info("== %s", title)


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


def train(data: Path, run: Path) -> Path:
    """Train the demo recipe (a tiny CLIP ViT) unless its checkpoint exists; resumes if killed."""
    from vvireid.training.cli import main as train_main

    checkpoint = run / "model.safetensors"
    if checkpoint.is_file() and (run / "DONE").is_file():
        log.info("model exists: %s", checkpoint)
        return checkpoint
    _step(f"training the '{RECIPE}' recipe on CPU into {run}")
    argv = ["fit", "--config", RECIPE, "--data-root", str(data), "--out", str(run)]
    if (run / "checkpoints" / "last.pt").is_file():
        argv.append("--resume")
    if train_main(argv) != 0:
        raise SystemExit("demo: training failed (see the messages above)")
    (run / "DONE").write_text("ok\n")
    return checkpoint


def evaluate(checkpoint: Path, data: Path, out: Path) -> dict:
    """Cross-modal evaluation on the held-out identities, both directions."""
    from vvireid.training.cli import main as train_main

    report_path = out / "report.json"
    if not report_path.is_file():
        _step("evaluating on held-out identities (ir_to_vis and vis_to_ir)")
        argv = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(data),
                "--dataset", DATASET_FORMAT, "--out", str(out)]
        if train_main(argv) != 0:
            raise SystemExit("demo: evaluation failed (see the messages above)")
    return json.loads(report_path.read_text())


def build_index(checkpoint: Path, data: Path, index: Path) -> None:
    """Encode every test tracklet (both modalities) into a FAISS gallery index."""
    from vvireid.indexer.cli import main as index_main

    if (index / "manifest.json").is_file():
        log.info("index exists: %s", index)
        return
    _step(f"indexing the test tracklets into {index}")
    argv = ["build", "--checkpoint", str(checkpoint), "--gallery", str(data),
            "--format", DATASET_FORMAT, "--split", "test", "--out", str(index)]
    if index_main(argv) != 0:
        raise SystemExit("demo: index build failed (see the messages above)")


def load_splits(data: Path) -> DatasetSplits:
    """The demo dataset's splits, read once and shared by the chance figure and the example query."""
    from vvireid.indexer.sources import load_dataset

    return load_dataset(DATASET_FORMAT, data)


def example_query(splits: DatasetSplits) -> tuple[list[Path], int]:
    """Frames of one infrared test tracklet (the default ir_to_vis query) and its pid."""
    query = splits.query["ir_to_vis"][0]
    return [Path(f) for f in query.frames[:6]], int(query.pid)


def serve(checkpoint: Path, index: Path, splits: DatasetSplits) -> int:
    from vvireid.server.cli import main as serve_main

    host = os.environ.get("VVIREID_HOST", "127.0.0.1")
    port = os.environ.get("VVIREID_PORT", "8000")
    frames, pid = example_query(splits)
    parts = " ".join(f"-F frames=@{shlex.quote(str(f))}" for f in frames)
    log.info("web page:  http://%s:%s/", host, port)
    log.info(
        "query (an infrared clip of person %d; the answer ranks visible tracklets):\n"
        "  curl -s -F modality=infrared -F top_k=5 %s http://%s:%s/query", pid, parts, host, port
    )
    return serve_main(["--checkpoint", str(checkpoint), "--index", str(index),
                       "--host", host, "--port", port])


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


def print_metrics(report: dict, chance: dict[str, float]) -> None:
    """One line per direction: R1 and mAP (percent) next to what chance would give."""
    for direction, metrics in report["directions"].items():
        log.info("%-10s R1 %5.1f%%  mAP %5.1f%%   (chance R1 about %.1f%%)", direction,
                 metrics["R1"], metrics["mAP"], chance.get(direction, 0.0))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    root = Path(os.environ.get("VVIREID_DEMO_DIR", ".demo"))
    data, run, index = root / "data", root / "run", root / "index"
    make_dataset(data)
    checkpoint = train(data, run)
    splits = load_splits(data)
    print_metrics(evaluate(checkpoint, data, root / "eval"), chance_r1(splits))
    build_index(checkpoint, data, index)
    if os.environ.get("VVIREID_DEMO_SERVE", "1") == "0":
        return 0
    return serve(checkpoint, index, splits)


if __name__ == "__main__":
    sys.exit(main())
