"""Micro-batching and back-pressure: the batcher itself, 32 concurrent clients against uvicorn,
and 503 + Retry-After when the queue is full."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_support import TinyGallery, live_server, make_settings, running_client
from vvireid.model.types import Modality
from vvireid.server.batcher import BatcherClosedError, MicroBatcher, QueueFullError


def gated_batcher(gate: threading.Event, seen: list[list[int]], **kwargs) -> MicroBatcher:
    def process(items: list[int]) -> list[int | BaseException]:
        gate.wait(10)
        seen.append(list(items))
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    options = {"max_batch": 4, "max_wait_s": 0.05, "queue_size": 16, **kwargs}
    return MicroBatcher(process, **options).start()


def test_batcher_groups_waiting_items_up_to_max_batch():
    gate, seen = threading.Event(), []
    batcher = gated_batcher(gate, seen)
    first = batcher.submit(0)
    time.sleep(0.1)  # the worker holds item 0 and is blocked in process()
    rest = [batcher.submit(i) for i in range(1, 10)]
    assert batcher.depth == 9
    gate.set()
    assert [f.result(5) for f in [first, *rest]] == [i * 10 for i in range(10)]
    assert seen == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    batcher.close()


def test_batcher_reports_item_errors_to_their_caller_only():
    gate, seen = threading.Event(), []
    gate.set()
    batcher = gated_batcher(gate, seen, max_wait_s=0.2)
    good, bad = batcher.submit(1), batcher.submit(-1)
    assert good.result(5) == 10
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(5)
    batcher.close()


def test_batcher_survives_a_failing_batch():
    calls = []

    def process(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return items

    batcher = MicroBatcher(process, max_batch=2, max_wait_s=0.0, queue_size=4).start()
    with pytest.raises(RuntimeError, match="exploded"):
        batcher.submit(1).result(5)
    assert batcher.submit(2).result(5) == 2
    batcher.close()


def test_batcher_queue_is_bounded_and_close_fails_pending():
    gate, seen = threading.Event(), []
    batcher = gated_batcher(gate, seen, queue_size=2, max_batch=1)
    running = batcher.submit(0)
    time.sleep(0.1)
    queued = [batcher.submit(1), batcher.submit(2)]
    with pytest.raises(QueueFullError, match="full"):
        batcher.submit(3)
    gate.set()
    assert running.result(5) == 0 and [f.result(5) for f in queued] == [10, 20]
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.submit(4)


@pytest.mark.parametrize("expecting", [False, True])
def test_batcher_waits_only_when_more_items_are_on_their_way(expecting):
    batcher = MicroBatcher(lambda items: items, max_batch=8, max_wait_s=0.5, queue_size=8,
                           expect_more=lambda: expecting).start()
    started = time.perf_counter()
    assert batcher.submit(1).result(5) == 1
    elapsed = time.perf_counter() - started
    batcher.close()
    if expecting:
        assert elapsed >= 0.45  # held the batch open for company
    else:
        assert elapsed < 0.4  # nobody else decoding: no batching delay


def batch_size_counts(metrics_text: str) -> tuple[int, int]:
    """(batches of size 1, all batches) from the batch-size histogram."""
    ones = re.search(r'^vvireid_batch_size_bucket\{le="1"\} (\d+)$', metrics_text, re.M)
    total = re.search(r"^vvireid_batch_size_count (\d+)$", metrics_text, re.M)
    return int(ones.group(1)), int(total.group(1))


def test_32_concurrent_clients_get_their_own_answers_batched(tiny_gallery: TinyGallery):
    probes = list(tiny_gallery.tracklets.values())
    payloads = {t.tracklet_id: t.files() for t in probes}
    settings = make_settings(tiny_gallery, max_batch=16, max_wait_ms=20, queue_size=64,
                             worker_threads=40)
    with live_server(settings) as base:
        start = threading.Barrier(32)

        def client(n: int) -> list[tuple[int, str, str]]:
            probe = probes[n % len(probes)]
            results = []
            with httpx.Client(base_url=base, timeout=60) as http:
                start.wait()
                for _ in range(3):
                    response = http.post(
                        "/v1/query", files=payloads[probe.tracklet_id],
                        data={"modality": probe.modality.label, "cross_modal": "false",
                              "top_k": "3"},
                    )
                    ok = response.is_success
                    top = response.json()["matches"][0]["tracklet_id"] if ok else ""
                    results.append((response.status_code, probe.tracklet_id, top))
            return results

        with ThreadPoolExecutor(32) as pool:
            outcomes = [r for rs in pool.map(client, range(32)) for r in rs]
        metrics = httpx.get(f"{base}/metrics").text

    assert len(outcomes) == 96
    assert [o for o in outcomes if o[0] != 200] == []
    # Batching must never mix answers up: each client gets its own tracklet back first.
    assert all(expected == top for _, expected, top in outcomes)
    ones, batches = batch_size_counts(metrics)
    assert batches < 96 and ones < batches, metrics  # some model calls served several queries
    assert 'vvireid_http_requests_total{route="/v1/query",method="POST",status="200"} 96' in metrics


def test_full_queue_answers_503_with_retry_after(tiny_gallery: TinyGallery):
    """Two slots, both taken by requests stuck behind a slow model: the third request is
    refused with 503 + Retry-After once its admission deadline passes."""
    settings = make_settings(tiny_gallery, max_batch=1, max_in_flight=2, queue_size=2,
                             max_wait_ms=0, admission_timeout_s=0.3)
    probe = tiny_gallery.of(Modality.INFRARED, 0)
    form = {"modality": "infrared"}
    with running_client(settings) as client:
        encoder = client.app.state.engine.encoder
        real_encode = encoder.encode_prepared
        gate, entered = threading.Event(), threading.Event()

        def slow_encode(*args, **kwargs):
            entered.set()
            gate.wait(30)  # a slow model: the worker is stuck on the first batch
            return real_encode(*args, **kwargs)

        encoder.encode_prepared = slow_encode
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/query", files=probe.files(), data=form)
            assert entered.wait(10)
            second = pool.submit(client.post, "/v1/query", files=probe.files(), data=form)
            deadline = time.monotonic() + 10
            while client.app.state.engine.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            rejected = client.post("/v1/query", files=probe.files(), data=form)
            waited = time.monotonic() - started
            gate.set()
            assert first.result(30).status_code == 200
            assert second.result(30).status_code == 200
        assert rejected.status_code == 503 and waited < 2.0
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "overloaded"
        assert "\nvvireid_queue_rejected_total 1\n" in client.get("/metrics").text
        assert client.post("/v1/query", files=probe.files(), data=form).status_code == 200
