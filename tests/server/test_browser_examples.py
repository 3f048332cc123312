"""The page's "try an example" in a real headless Chromium: one click loads the example's frames
from the server, searches across modalities, and marks the matches of the example's person."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from server_support import TinyGallery, live_server, make_settings
from test_browser import CHROMIUM, DevTools, csp_violations, start_chromium
from vvireid.model.types import Modality

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def test_page_runs_an_example_query_with_one_click(tiny_gallery: TinyGallery, tmp_path: Path):
    probe = tiny_gallery.of(Modality.INFRARED, 2)
    example = tmp_path / "examples" / "ir_to_vis-0002"
    example.mkdir(parents=True)
    for i, frame in enumerate(probe.frames):
        shutil.copyfile(frame, example / f"{i:02d}{frame.suffix}")
    (example / "example.json").write_text(json.dumps(
        {"modality": "infrared", "pid": 2, "camid": probe.camid, "label": "infrared person 2"}))
    with live_server(make_settings(tiny_gallery, examples_dir=tmp_path / "examples")) as base:
        process, ws_url = start_chromium(f"{base}/", tmp_path / "profile")
        devtools = DevTools(ws_url)
        try:
            devtools.call("Runtime.enable")
            devtools.call("Log.enable")
            devtools.wait_for("(document.getElementById('status') || {}).textContent === 'ready'")
            devtools.wait_for("!document.getElementById('examples').hidden")
            label = devtools.evaluate("document.querySelector('#example-list button').textContent")
            devtools.evaluate("document.querySelector('#example-list button').click()")
            devtools.wait_for("document.querySelectorAll('#results .match').length > 0")
            cards = devtools.evaluate(
                "Array.from(document.querySelectorAll('#results .match')).map(c => "
                "({same: c.classList.contains('same'), text: c.innerText}))"
            )
            count = devtools.evaluate("document.getElementById('frame-count').textContent")
            errors = [e for e in devtools.events if e.get("method") == "Runtime.exceptionThrown"]
            blocked = csp_violations(devtools)
        finally:
            devtools.close()
            process.kill()
            process.wait(10)

    assert label == "infrared person 2"
    assert count.startswith(f"{len(probe.frames)} frame")
    # Cross-modal: the tiny gallery's four visible tracklets, one of them person 2, marked.
    assert len(cards) == 4 and all("visible" in card["text"] for card in cards)
    marked = [card for card in cards if card["same"]]
    assert len(marked) == 1 and "pid 2" in marked[0]["text"]
    assert "same person" in marked[0]["text"]
    assert errors == [] and blocked == []
