"""The Python API (``vvireid.indexer.api.ReID``): the README example runs as written, every input
form gives the encoder's vector, and the search options behave."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vvireid.indexer.api import ReID
from vvireid.indexer.calibration import Calibration, calibration_path
from vvireid.indexer.encode import TrackletEncoder
from vvireid.indexer.manifest import read_manifest
from vvireid.indexer.store import GalleryIndex, GalleryItem
from vvireid.model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README's Python API section has no python block"
    return block.group(1)


@pytest.fixture
def workdir(tmp_path, checkpoint, make_gallery, frames_of, monkeypatch) -> Path:
    """The README's files: model.safetensors, gallery-index/ and a query/ folder of frames."""
    model_path = checkpoint()
    target = tmp_path / "model.safetensors"
    model_path.rename(target)
    tracklets = read_manifest(make_gallery(12))
    encoder = TrackletEncoder(load_checkpoint(target), device="cpu")
    gallery = GalleryIndex.create(tmp_path / "gallery-index", dim=encoder.dim,
                                  model_fingerprint=encoder.fingerprint,
                                  similarity=encoder.similarity, device="cpu")
    gallery.add([GalleryItem(t.tracklet_id, t.modality, t.camid, pid=t.pid) for t in tracklets],
                np.stack([encoder.encode_frames(t.frames, t.camid) for t in tracklets]))
    gallery.save()
    gallery.close()
    query = tmp_path / "query"
    query.mkdir()
    for i, frame in enumerate(tracklets[1].frames):  # an infrared gallery tracklet's frames
        Image.open(frame).save(query / f"{i:03d}.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_example_runs(workdir, capsys):
    namespace: dict = {}
    exec(compile(readme_api_block(), "README.md", "exec"), namespace)  # noqa: S102
    reid = namespace["reid"]
    assert namespace["vector"].shape == (reid.dim,) and namespace["vector"].dtype == np.float32
    assert namespace["batch"].shape == (2, reid.dim)
    np.testing.assert_allclose(namespace["batch"][1], namespace["vector"], atol=1e-6)
    matches = namespace["matches"]
    assert 1 <= len(matches) <= 5 and [m.rank for m in matches] == list(range(1, len(matches) + 1))
    assert all(m.modality.label == "visible" for m in matches)  # infrared query -> visible gallery
    assert len(capsys.readouterr().out.splitlines()) == len(matches)


def test_every_input_form_gives_the_encoders_vector(workdir):
    reid = ReID.load("model.safetensors", device="cpu")
    paths = sorted(str(p) for p in Path("query").iterdir())
    reference = TrackletEncoder(load_checkpoint("model.safetensors"), device="cpu").encode_frames(paths)
    images = [Image.open(p).convert("RGB") for p in paths]
    arrays = np.stack([np.asarray(im) for im in images])
    forms = {
        "paths": paths,
        "folder": "query",
        "pil": images,
        "arrays": list(arrays),
        "array": arrays,
        "uint8 tensor": torch.from_numpy(arrays).permute(0, 3, 1, 2),
        "float tensor": torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255,
    }
    for name, form in forms.items():
        np.testing.assert_allclose(reid.encode(form), reference, atol=1e-5, err_msg=name)
    batch = reid.encode(np.stack([arrays, arrays[::-1]]))
    assert batch.shape == (2, reid.dim)
    np.testing.assert_allclose(batch[0], reference, atol=1e-5)
    assert reid.encode([paths, images, arrays]).shape == (3, reid.dim)


def test_bad_inputs_name_the_problem(workdir):
    reid = ReID.load("model.safetensors", device="cpu")
    with pytest.raises(ValueError, match="not a folder of frames"):
        reid.encode("nowhere")
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        reid.encode(torch.zeros(2, 5, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        reid.encode(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(RuntimeError, match="open_gallery"):
        reid.search("query")


def test_calibration_gives_probabilities_and_min_probability_filters(workdir):
    reid = ReID.load("model.safetensors", device="cpu")
    reid.open_gallery("gallery-index")
    with pytest.raises(ValueError, match="calibrate"):
        reid.search("query", min_probability=0.5)
    plain = reid.search("query", top_k=12)
    assert all(m.probability is None for m in plain)
    scores = np.array([m.score for m in plain])
    middle = float(np.median(scores))
    Calibration(50.0, -50.0 * middle, reid.encoder.fingerprint).save(
        calibration_path("model.safetensors"))
    reid = ReID.load("model.safetensors", device="cpu")
    reid.open_gallery("gallery-index")
    rated = reid.search("query", top_k=12)
    assert [m.tracklet_id for m in rated] == [m.tracklet_id for m in plain]
    probabilities = [m.probability for m in rated]
    assert probabilities == sorted(probabilities, reverse=True)  # monotone in the score
    kept = reid.search("query", top_k=12, min_probability=0.5)
    assert kept and all(m.probability >= 0.5 for m in kept)
    assert [m.tracklet_id for m in kept] == [m.tracklet_id for m in rated if m.probability >= 0.5]
    assert len(kept) < len(rated)


def test_rerank_reorders_within_the_shortlist(workdir):
    reid = ReID.load("model.safetensors", device="cpu")
    reid.open_gallery("gallery-index")
    plain = reid.search("query", top_k=6, cross_modal=False, modality="visible")
    reranked = reid.search("query", top_k=6, cross_modal=False, modality="visible", rerank=True)
    assert sorted(m.tracklet_id for m in reranked) == sorted(m.tracklet_id for m in plain)
    assert [m.rank for m in reranked] == list(range(1, 7))
