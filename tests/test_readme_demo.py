"""The README's first command, run literally in a copy of the repository, until the server answers.

This is the newcomer's path: the command is read from the README (not restated here), run in a
temporary copy of the checkout that shares this checkout's virtual environment, and the printed
``curl`` query is sent to the server it starts. The screen must be clean: every line once, no
traceback, no JSON dump, no warnings that do not apply, and one final box with the real URL.
The first run asks for ``VVIREID_PORT=0`` and must print the port it got. A second run must reuse
the dataset, the model and the index and serve again. A taken port fails at once, naming
``VVIREID_PORT``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 1200
RULE = "=" * 78
# Held-out cross-modal R1 (%) the demo must show in both directions. The shipped model measures
# R1 60.1% (ir_to_vis) and 58.8% (vis_to_ir), untrained 1.1% / 0.5%; the margin absorbs another
# CPU's rounding, not a broken model.
MIN_R1 = 45.0
URL_BUDGET_S = 240
# Messages the demo must not show: open_clip's random-init warning (weights are loaded right
# after), faiss's loader probing, tracebacks, and the JSON reports the commands print.
NOISE = ("initialized randomly", "swigfaiss", "Traceback", "CancelledError", '"directions"')


def readme_demo_command() -> list[str]:
    """The first command of the README's first bash block (the demo)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README has no bash block"
    first = block.group(1).strip().splitlines()[0]
    command = first.split("#")[0].strip()
    assert command, "README's first bash line is empty"
    return shlex.split(command)


def copy_checkout(dest: Path) -> None:
    """Copy tracked and untracked-not-ignored files (mtimes kept), then share the venv."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    # The copy shares the venv, whose editable install points at this checkout: make must not
    # reinstall from the copy (it would whenever pyproject.toml is newer than the install stamp).
    stamp = ROOT / ".venv" / ".installed-stamp"
    if stamp.exists():
        stamp.touch()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_demo(workdir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "VVIREID_PORT": str(port), "VVIREID_HOST": "127.0.0.1"}
    env.pop("VVIREID_DEMO_DIR", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            readme_demo_command(), cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(process: subprocess.Popen, log_path: Path, offset: int = 0) -> int:
    """Wait for the final box (printed once the server answers); returns the port it shows."""
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"demo exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        text = log_path.read_text()[offset:]
        shown = re.search(r"vvireid demo is serving: http://127\.0\.0\.1:(\d+)/", text)
        if shown and text.rstrip().endswith(RULE):
            port = int(shown.group(1))
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            return port
        time.sleep(2)
    pytest.fail(f"demo not ready after {DEMO_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def screen_lines(text: str) -> list[str]:
    """What a terminal keeps: progress bars redraw one line with \\r, so keep the last state."""
    return [line.split("\r")[-1].rstrip() for line in text.splitlines()]


def assert_clean_screen(text: str) -> None:
    """Each line once, no noise, and the box last: a URL, metrics, a curl line."""
    lines = [line for line in screen_lines(text) if line.strip()]
    progress = re.compile(r"\d+%\|")
    repeated = {line: n for line, n in Counter(
        line for line in lines if not progress.search(line) and line != RULE).items() if n > 1}
    assert not repeated, f"lines printed more than once: {repeated}\n{text[-3000:]}"
    for noise in NOISE:
        assert noise not in text, f"the demo printed {noise!r}:\n{text[-3000:]}"
    assert not any(line.lstrip().startswith(("{", "}")) for line in lines), text[-3000:]
    assert lines.count(RULE) == 2 and lines[-1] == RULE, text[-3000:]
    box = lines[lines.index(RULE) + 1:-1]
    assert box[0].startswith("vvireid demo is serving: http://"), box
    assert any(line.startswith("curl ") for line in box), box
    assert sum("chance R1 about" in line for line in box) == 2, box


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def printed_curl(log_text: str) -> list[str]:
    """The ready-to-paste curl command the demo printed."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip().startswith("curl ")]
    assert lines, f"the demo printed no curl command:\n{log_text[-3000:]}"
    return shlex.split(lines[-1])


def send_curl_as_httpx(argv: list[str], workdir: Path) -> httpx.Response:
    """Send what the printed curl command sends (multipart fields and files) with httpx."""
    url = argv[-1]
    data, files = {}, []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag != "-F":
            continue
        key, _, field = value.partition("=")
        if field.startswith("@"):
            path = Path(field[1:])
            path = path if path.is_absolute() else workdir / path
            files.append((key, (path.name, path.read_bytes(), "image/jpeg")))
        else:
            data[key] = field
    return httpx.post(url, data=data, files=files, timeout=60)


@pytest.mark.slow
def test_readme_demo_serves_cross_modal_matches_and_reuses_its_work(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    workdir = tmp_path / "clone"
    copy_checkout(workdir)
    log_path = tmp_path / "demo.log"

    started = time.monotonic()
    process = start_demo(workdir, 0, log_path)  # VVIREID_PORT=0: any free port, shown for real
    try:
        port = wait_ready(process, log_path)
        took = time.monotonic() - started
        # Issue 17: at most 4 minutes from the end of the install to the URL (measured: 24 s).
        assert took <= URL_BUDGET_S, f"the demo took {took:.0f} s to serve (budget {URL_BUDGET_S} s)"
        assert port != 0
        log_text = log_path.read_text()
        assert_clean_screen(log_text)
        argv = printed_curl(log_text)
        assert argv[-1] == f"http://127.0.0.1:{port}/query"
        response = send_curl_as_httpx(argv, workdir)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["matches"], body
        # The printed query is infrared: the default cross-modal search ranks visible tracklets.
        assert {match["modality"] for match in body["matches"]} == {"visible"}
        assert [m["rank"] for m in body["matches"]] == list(range(1, len(body["matches"]) + 1))
        thumb = httpx.get(f"http://127.0.0.1:{port}{body['matches'][0]['thumbnail_url']}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        for direction in ("ir_to_vis", "vis_to_ir"):
            found = re.search(rf"{direction}\s+R1\s+([\d.]+)%.*untrained R1 ([\d.]+)%.*"
                              r"chance R1 about ([\d.]+)%", log_text)
            assert found, f"the demo printed no {direction} evaluation next to the untrained model"
            r1, untrained, chance = (float(v) for v in found.groups())
            # Measured: R1 60.1% / 58.8%, untrained 1.1% / 0.5%, chance 0.8% (seed 0).
            assert r1 >= MIN_R1, f"{direction}: R1 {r1}% < {MIN_R1}%: the demo model got worse"
            assert r1 >= untrained + 30 and r1 >= 20 * chance, (direction, r1, untrained, chance)
        examples = httpx.get(f"http://127.0.0.1:{port}/v1/examples").json()["examples"]
        assert {e["modality"] for e in examples} == {"infrared", "visible"}, examples
        frame = httpx.get(f"http://127.0.0.1:{port}/{examples[0]['frames'][0]}")
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    finally:
        stop(process)

    port = free_port()
    process = start_demo(workdir, port, log_path)
    try:
        assert wait_ready(process, log_path, offset=len(log_text)) == port
        second = log_path.read_text()[len(log_text):]
        assert_clean_screen(second)
        assert "dataset exists" in second and "model exists" in second and "index exists" in second
        assert "training the" not in second
    finally:
        stop(process)


def test_demo_refuses_a_taken_port_at_once_and_names_the_variable(tmp_path: Path) -> None:
    """Before minutes of work, not after: the port is checked first."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "VVIREID_PORT": str(port), "VVIREID_HOST": "127.0.0.1",
               "VVIREID_DEMO_DIR": str(tmp_path / "demo")}
        done = subprocess.run([sys.executable, "-m", "scripts.demo"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"port {port}" in done.stderr and "VVIREID_PORT=0" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "demo" / "data").exists()  # nothing generated
