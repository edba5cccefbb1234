"""Load test: 8 closed-loop clients, then a ninth over the queue limit.

The duration is ``EDGEDERM_LOAD_SECONDS`` (default 5 s, what CI runs); the full
test of the serving docs is 60 s: ``EDGEDERM_LOAD_SECONDS=60 pytest -m slow -k load``,
or ``python -m edgederm.serve.loadtest --bundle BUNDLE --image IMAGE --seconds 60``.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from edgederm.runtime import load
from edgederm.serve.loadtest import Client, infer_body, run_clients
from edgederm.serve.protocol import Limits
from edgederm.serve.server import Server

CLIENTS = 8


@pytest.mark.slow
def test_eight_clients_without_errors_or_lost_requests_then_a_ninth_gets_429(serve_bundles, lesion_images,
                                                                             gated_model, record_property):
    seconds = float(os.environ.get("EDGEDERM_LOAD_SECONDS", "5"))
    gated = gated_model(load(serve_bundles["classifier"], precision="fp32"))
    gated.gate.set()
    image = lesion_images["lesion_jpg"].read_bytes()
    # One running and seven waiting: the eight clients always fit, a ninth request does not.
    limits = Limits(workers=1, queue_size=CLIENTS - 1)
    with Server(gated, http_port=0, grpc_port=None, limits=limits) as server:
        url = server.addresses()["http"]
        report = run_clients(url, server.name, image, clients=CLIENTS, seconds=seconds, warmup_s=1.0)
        print("\n".join(report.lines()))
        record_property("figure:load_throughput_per_s", f"{report.throughput_per_s:.1f}")
        record_property("figure:load_p50_p99_ms", f"{report.p50_ms:.1f} / {report.p99_ms:.1f}")
        record_property("figure:load_rss_growth", f"{(report.rss_growth or 0) * 100:+.2f}%")
        assert report.sent > CLIENTS
        assert report.lost == 0 and not report.errors and report.ok == report.sent
        assert report.rss_growth is not None and report.rss_growth < 0.05

        # The ninth client: with the eight requests admitted (one running, seven waiting),
        # it is refused at once with 429, and the eight are all answered.
        gated.gate.clear()
        body, headers = infer_body(image)
        path = f"/v2/models/{server.name}/infer"
        statuses: list[int] = []

        def one_request() -> None:
            client = Client(url)
            try:
                statuses.append(client.send(path, body, headers)[0])
            finally:
                client.close()

        threads = [threading.Thread(target=one_request, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while server.service.queue.running + server.service.queue.depth < CLIENTS:
            assert time.monotonic() < deadline, "the eight requests were not all admitted"
            time.sleep(0.01)
        ninth = Client(url, timeout=10)
        status, elapsed = ninth.send(path, body, headers)
        ninth.close()
        assert status == 429 and elapsed < 5
        gated.gate.set()
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * CLIENTS
