"""The deployment case of the README's Docker recipe: root trains and indexes, another user serves.

A checkpoint and an index written by root (under umask 002) must come out with the umask's modes
(0664: not owner-only like ``mkstemp``, not a fixed 0644), and ``vvireid-serve`` running as the
unprivileged user ``nobody`` must load them read-only and answer a query.

How the server becomes ``nobody``: with ``setpriv`` when ``nobody`` can run this interpreter;
otherwise (an interpreter under a root-only folder such as ``/root/.pyenv``) a root process
imports the server stack, drops to ``nobody`` (uid, gid and groups) and only then runs the CLI,
so every read of the checkpoint and the index still happens as ``nobody``. Skipped unless the
tests run as root, and when ``nobody`` cannot reach the checkout itself (a clone in an
owner-only folder such as ``mktemp -d``'s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_support import TinyGallery, build_tiny_gallery
from vvireid.model.types import Modality

UMASK = 0o002
CHECKOUT = Path(__file__).resolve().parents[2]
USER = "nobody"
READY_TIMEOUT_S = 120

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root to write as root and serve as an unprivileged user",
)]

# Run as root: import what serving needs, drop to the unprivileged user, then run the CLI.
DROP_THEN_SERVE = """
import importlib, os, pkgutil, sys
import PIL.Image, uvicorn, uvicorn.config
import vvireid.indexer, vvireid.model, vvireid.server
for package in (vvireid.model, vvireid.indexer, vvireid.server):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith(".__main__"):  # importing one runs its command line
            importlib.import_module(module.name)
PIL.Image.init()
uvicorn.config.Config(app=None, log_level="info").load()
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
from vvireid.server.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _can_run_interpreter(uid: int, gid: int) -> bool:
    probe = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable, "-c",
         "import vvireid.server.cli"],
        capture_output=True, timeout=120,
    )
    return probe.returncode == 0


def _server_command(uid: int, gid: int, argv: list[str]) -> list[str]:
    if shutil.which("setpriv") and _can_run_interpreter(uid, gid):
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable,
                "-m", "vvireid.server", *argv]
    if not _can_read_checkout(uid):
        pytest.skip(f"{USER} cannot read this checkout ({CHECKOUT} or a folder above it is "
                    "owner-only), so no server can run from it as that user")
    return [sys.executable, "-c", DROP_THEN_SERVE, str(uid), str(gid), *argv]


def _can_read_checkout(uid: int) -> bool:
    """Whether ``uid`` can reach the sources and the package metadata the server reads after
    dropping privileges (every folder on the way must be searchable by it)."""
    folder = CHECKOUT
    while True:
        mode = folder.stat()
        others_x = bool(mode.st_mode & stat.S_IXOTH) or mode.st_uid == uid
        if not others_x:
            return False
        if folder.parent == folder:
            return True
        folder = folder.parent


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder the unprivileged user can traverse (pytest's tmp_path is owner-only)."""
    folder = Path(tempfile.mkdtemp(prefix="vvireid-unprivileged-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(process: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"the server as {USER} exited with {process.returncode}:\n{output}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"the server as {USER} was not ready after {READY_TIMEOUT_S} s")


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")] if p.exists()}


def test_server_as_unprivileged_user_serves_what_root_wrote(shared_folder: Path) -> None:
    with _umask(UMASK):
        gallery: TinyGallery = build_tiny_gallery(shared_folder)
    want_file, want_dir = 0o666 & ~UMASK, 0o777 & ~UMASK
    assert stat.S_IMODE(gallery.checkpoint.stat().st_mode) == want_file
    wrong = {name: oct(mode) for name, mode in _modes(gallery.index).items()
             if mode != (want_dir if (gallery.index / name).is_dir() else want_file)}
    assert not wrong, f"index files not created with the umask's modes ({oct(want_file)}): {wrong}"

    uid, gid = _ids(USER)
    port = _free_port()
    argv = ["--checkpoint", str(gallery.checkpoint), "--index", str(gallery.index),
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--log-level", "warning"]
    env = {**os.environ, "HOME": str(shared_folder)}
    env = {k: v for k, v in env.items() if not k.startswith("VVIREID_")}
    process = subprocess.Popen(_server_command(uid, gid, argv), env=env, cwd=shared_folder,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base)
        query = gallery.of(Modality.INFRARED, pid=1)
        response = httpx.post(f"{base}/query", files=query.files(),
                              data={"modality": "infrared", "top_k": "3"}, timeout=60)
        assert response.status_code == 200, response.text
        matches = response.json()["matches"]
        assert matches and {m["modality"] for m in matches} == {"visible"}
        thumbnail = httpx.get(f"{base}{matches[0]['thumbnail_url']}", timeout=10)
        assert thumbnail.status_code == 200, thumbnail.text
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
