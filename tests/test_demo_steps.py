"""Steps of scripts/demo.py that the end-to-end README test cannot reach cheaply: a ``.demo`` left by
an older version (another model) is replaced, not served with stale figures; the example queries
are the first held-out query clips of each direction, one per person."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vvireid.indexer.sources import load_dataset
from vvireid.training.data.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_demo_root(root: Path, model_bytes: bytes) -> None:
    (root / "run").mkdir(parents=True)
    (root / "run" / "model.safetensors").write_bytes(model_bytes)
    (root / "run" / "DONE").write_text("ok\n")
    for name in ("eval", "index", "data"):
        (root / name).mkdir()
        (root / name / "kept-or-not").write_text("x")
    (root / "index.built").write_text("ok\n")


def test_an_older_demo_model_and_its_outputs_are_replaced(tmp_path: Path) -> None:
    demo = load_demo()
    shipped = tmp_path / "shipped.safetensors"
    shipped.write_bytes(b"the shipped model")

    make_demo_root(tmp_path / "same", b"the shipped model")
    demo.drop_stale_outputs(tmp_path / "same", shipped)
    assert (tmp_path / "same" / "run" / "model.safetensors").is_file()
    assert (tmp_path / "same" / "index.built").is_file()

    make_demo_root(tmp_path / "old", b"a model the old demo trained")
    demo.drop_stale_outputs(tmp_path / "old", shipped)
    left = sorted(p.name for p in (tmp_path / "old").iterdir())
    assert left == ["data"]  # the dataset does not depend on the model


def test_examples_are_the_first_query_clips_one_per_person(tmp_path: Path) -> None:
    demo = load_demo()
    synthesize(tmp_path / "data", "hitsz-vcm", ids=12, seed=0, frames=(12, 12),
               image_size=(64, 32))
    splits = load_dataset("hitsz-vcm", tmp_path / "data")
    folder = demo.write_examples(splits, tmp_path / "examples")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert len(names) == 2 * demo.EXAMPLES_PER_DIRECTION
    for direction, queries in splits.query.items():
        first = list(dict.fromkeys(int(q.pid) for q in queries))[:demo.EXAMPLES_PER_DIRECTION]
        assert [n for n in names if n.startswith(direction)] == [
            f"{direction}-{pid:04d}" for pid in sorted(first)]
    meta = json.loads((folder / names[0] / "example.json").read_text())
    assert meta["modality"] in ("infrared", "visible") and isinstance(meta["pid"], int)
    frames = sorted((folder / names[0]).glob("*.jpg"))
    assert len(frames) == demo.QUERY_FRAMES
