"""The page's "try an example" queries: listed from ``examples_dir``, frames served from it only,
and a listed example sent as a query ranks the gallery like any upload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from server_support import TinyGallery, make_settings, running_client
from vvireid.model.types import Modality


def write_example(folder: Path, name: str, frames: list[Path], **meta) -> None:
    (folder / name).mkdir(parents=True)
    for i, frame in enumerate(frames):
        shutil.copyfile(frame, folder / name / f"{i:02d}{frame.suffix}")
    (folder / name / "example.json").write_text(json.dumps(meta))


def test_examples_are_listed_served_and_answer_a_query(tiny_gallery: TinyGallery, tmp_path):
    probe = tiny_gallery.of(Modality.INFRARED, 2)
    folder = tmp_path / "examples"
    write_example(folder, "ir-2", list(probe.frames), modality="infrared", pid=probe.pid,
                  camid=probe.camid, label="infrared clip of person 2")
    write_example(folder, "broken", list(probe.frames), modality="ultraviolet")  # skipped
    (folder / "no-meta").mkdir()  # skipped: no example.json
    (tmp_path / "secret.jpg").write_bytes(b"not for the page")

    with running_client(make_settings(tiny_gallery, examples_dir=folder)) as client:
        listed = client.get("/v1/examples")
        assert listed.status_code == 200
        examples = listed.json()["examples"]
        assert [e["name"] for e in examples] == ["ir-2"]
        example = examples[0]
        assert example["modality"] == "infrared" and example["pid"] == probe.pid
        assert len(example["frames"]) == len(probe.frames)

        mime = "image/png" if probe.frames[0].suffix == ".png" else "image/jpeg"
        files = []
        for url, original in zip(example["frames"], probe.frames, strict=True):
            frame = client.get("/" + url)
            assert frame.status_code == 200 and frame.headers["content-type"] == mime
            assert frame.content == original.read_bytes()
            files.append(("frames", (url.rsplit("/", 1)[1], frame.content, mime)))
        body = client.post("/v1/query", files=files, data={"modality": "infrared"}).json()
        assert body["matches"] and {m["modality"] for m in body["matches"]} == {"visible"}

        for bad in ("/v1/examples/ir-2/..%2F..%2Fsecret.jpg", "/v1/examples/..%2Fsecret.jpg/x.jpg",
                    "/v1/examples/ir-2/example.json", "/v1/examples/ir-2/99.png"):
            response = client.get(bad)
            assert response.status_code == 404, bad
            assert b"not for the page" not in response.content


def test_without_examples_dir_the_list_is_a_clear_404(tiny_gallery: TinyGallery):
    with running_client(make_settings(tiny_gallery)) as client:
        response = client.get("/v1/examples")
    assert response.status_code == 404
    assert "VVIREID_EXAMPLES_DIR" in response.json()["error"]["message"]
