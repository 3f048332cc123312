"""The web page in a real headless Chromium: pick frames in the file input, search, see results.

Chromium is driven over the DevTools protocol with a minimal websocket client written here (no
new test dependency): ``DOM.setFileInputFiles`` fills the page's real file picker, so the page's
own JavaScript reads the files and posts them, exactly as after a user's pick.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from server_support import TinyGallery, live_server, make_settings
from vvireid.model.types import Modality

CHROMIUM = Path("/usr/bin/chromium")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; "
        "make test installs it)",
    ),
]


class DevTools:
    """A tiny synchronous DevTools client: one websocket, request/response by id."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        url = urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET {url.path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
             "Upgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if b" 101 " not in head.split(b"\r\n")[0] or accept.encode() not in head:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self.next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        self.sock.close()

    def _send(self, payload: bytes, opcode: int = 0x1) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _message(self) -> dict:
        parts = []
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(length)  # server frames are never masked
            opcode = first & 0x0F
            if opcode == 0x9:
                self._send(payload, opcode=0xA)
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            parts.append(payload)
            if first & 0x80:
                return json.loads(b"".join(parts))

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:
            message = self._message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression}")


def start_chromium(url: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Launch headless Chromium on ``url``; returns the process and the page's websocket URL."""
    process = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--window-size=1280,900", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            port = int(port_file.read_text().split()[0])
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            except httpx.TransportError:
                targets = []
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return process, pages[0]["webSocketDebuggerUrl"]
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with code {process.returncode}")
        time.sleep(0.1)
    process.kill()
    raise TimeoutError("chromium did not open its DevTools port")


def test_page_searches_picked_frames(tiny_gallery: TinyGallery, tmp_path: Path):
    probe = tiny_gallery.of(Modality.INFRARED, 2)
    # Pick the frames in shuffled order: the page must send them in file-name order.
    picked = [str(p) for p in reversed(probe.frames)]
    with live_server(make_settings(tiny_gallery)) as base:
        in_order = httpx.post(f"{base}/v1/query", files=probe.files(), timeout=30,
                              data={"modality": "infrared", "cross_modal": "false"}).json()
        process, ws_url = start_chromium(f"{base}/", tmp_path / "profile")
        devtools = DevTools(ws_url)
        try:
            devtools.call("Runtime.enable")
            devtools.wait_for("(document.getElementById('status') || {}).textContent === 'ready'")
            root = devtools.call("DOM.getDocument")["root"]["nodeId"]
            node = devtools.call("DOM.querySelector", nodeId=root, selector="#frames")["nodeId"]
            devtools.call("DOM.setFileInputFiles", files=picked, nodeId=node)
            devtools.wait_for("document.getElementById('frame-count').textContent"
                              ".startsWith('6 frame')")
            devtools.evaluate("document.querySelector('input[value=infrared]').click();"
                              "document.getElementById('cross-modal').click();"
                              "document.getElementById('top-k').value = '3';")
            assert devtools.evaluate("document.getElementById('cross-modal').checked") is False
            devtools.evaluate("document.getElementById('search').click()")
            devtools.wait_for("document.querySelectorAll('#results .match').length === 3")
            cards = devtools.evaluate(
                "Array.from(document.querySelectorAll('#results .match')).map(c => "
                "({id: c.dataset.trackletId, text: c.innerText}))"
            )
            devtools.wait_for("Array.from(document.querySelectorAll('#results .match img'))"
                              ".every(i => i.complete && i.naturalWidth > 0)")
            timings = devtools.evaluate("document.getElementById('timings').textContent")
            shot = devtools.call("Page.captureScreenshot", format="png")["data"]
            (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
            if os.environ.get("VVIREID_SCREENSHOT"):
                shutil.copy(tmp_path / "page.png", os.environ["VVIREID_SCREENSHOT"])
            # A broken frame: the page shows the server's error, naming the part.
            broken = tmp_path / "000-broken.jpg"
            broken.write_bytes(b"\xff\xd8 not really a jpeg")
            devtools.call("DOM.setFileInputFiles", files=[str(broken)], nodeId=node)
            devtools.wait_for("document.getElementById('frame-count').textContent"
                              ".startsWith('1 frame')")
            devtools.evaluate("document.getElementById('search').click()")
            error_text = devtools.wait_for("!document.getElementById('error').hidden && "
                                           "document.getElementById('error').textContent")
            stale = devtools.evaluate("document.querySelectorAll('#results .match').length")
            errors = [e for e in devtools.events if e.get("method") == "Runtime.exceptionThrown"]
        finally:
            devtools.close()
            process.kill()
            process.wait(10)

    assert cards[0]["id"] == probe.tracklet_id
    # Same score as the frames posted in temporal order: the page sorted the shuffled pick.
    assert f"score {in_order['matches'][0]['score']:.4f}" in cards[0]["text"]
    assert "pid 2" in cards[0]["text"] and "infrared" in cards[0]["text"]
    assert all("infrared" in card["text"] for card in cards)
    assert "6 infrared frames" in timings and "total" in timings
    assert "422 invalid_frame [frames[0]]" in error_text and "000-broken.jpg" in error_text
    assert errors == []
    assert stale == 0  # the previous matches are cleared when a query fails


def csp_violations(devtools: DevTools) -> list[str]:
    """Console and log messages in which Chromium reports a Content-Security-Policy block."""
    texts = []
    for event in devtools.events:
        if event.get("method") == "Log.entryAdded":
            texts.append(event["params"]["entry"].get("text", ""))
        elif event.get("method") == "Runtime.consoleAPICalled":
            texts += [str(a.get("value", "")) for a in event["params"].get("args", [])]
    return [t for t in texts if "Content Security Policy" in t]


@pytest.mark.parametrize(
    ("path", "rendered"),
    [
        # Swagger UI: one block per operation, the query route among them.
        ("/docs", "Array.from(document.querySelectorAll('.opblock-summary-path'))"
                  ".map(e => e.textContent.trim())"),
        # ReDoc: the operations in its side menu.
        ("/redoc", "Array.from(document.querySelectorAll('[role=menuitem] span, li label'))"
                   ".map(e => e.textContent.trim())"),
    ],
)
def test_api_docs_render_offline(tiny_gallery: TinyGallery, tmp_path: Path, path, rendered):
    """/docs and /redoc load their assets from this server (Chromium runs with networking off
    beyond loopback) under the strict CSP, and show the API's operations."""
    with live_server(make_settings(tiny_gallery)) as base:
        html = httpx.get(base + path, timeout=10).text
        assert "cdn" not in html.lower() and "<script>" not in html
        process, ws_url = start_chromium(f"{base}{path}", tmp_path / "profile")
        devtools = DevTools(ws_url)
        try:
            devtools.call("Runtime.enable")
            devtools.call("Log.enable")
            devtools.call("Page.reload")
            devtools.wait_for(f"{rendered}.length > 3", timeout=60)
            shown = " ".join(devtools.evaluate(rendered))
            errors = [e for e in devtools.events if e.get("method") == "Runtime.exceptionThrown"]
            blocked = csp_violations(devtools)
        finally:
            devtools.close()
            process.kill()
            process.wait(10)
    expected = "/v1/query" if path == "/docs" else "Rank gallery tracklets"
    assert expected in shown, shown
    # ReDoc's "powered by" logo comes from its CDN; the CSP blocks it (nothing else is needed).
    assert errors == [] and [b for b in blocked if "Loading the image" not in b] == []
