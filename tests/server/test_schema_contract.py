"""The OpenAPI schema is the contract: schemathesis (v4) fuzzes every operation of a live server
on loopback from /openapi.json and must find nothing (no 5xx, every status and body documented,
every schema-violating request refused, auth enforced as declared).

One check is left out: ``positive_data_acceptance`` expects 2xx for any schema-valid request, and
no OpenAPI schema can say "the bytes of a decodable JPEG": random bytes in ``frames`` are rightly
refused with a 422 naming the frame.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_support import TinyGallery, live_server, make_settings

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed"),
]


def test_schemathesis_finds_no_failure(tiny_gallery: TinyGallery, index_copy, tmp_path):
    key = tmp_path / "key"
    key.write_text("contract-key\n")
    settings = make_settings(tiny_gallery, index=index_copy, api_key_file=key)
    with live_server(settings) as base:
        run = subprocess.run(
            [str(SCHEMATHESIS), "run", f"{base}/openapi.json", "--max-examples", "10",
             "--seed", "1", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--header", "X-API-Key: contract-key", "--no-color", "--request-timeout", "20"],
            capture_output=True, text=True, timeout=240,
        )
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    generated = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert generated and generated.group(1) == generated.group(2) != "0", tail
