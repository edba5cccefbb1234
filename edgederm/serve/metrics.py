"""Prometheus metrics of one server and its structured (JSON lines) access log.

Each server has its own registry, so two servers in one process (tests, a device
serving two bundles) do not share counters. The access log holds no patient data:
no metadata values, no image bytes, only sizes, outcome and timing.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

access_log = logging.getLogger("edgederm.serve.access")

# Seconds: a tiny model answers in milliseconds, a 4096 px segmentation on a Jetson in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open files
        self.requests = Counter("edgederm_requests", "Requests answered, by protocol, endpoint and status",
                                ["protocol", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("edgederm_infer_latency_seconds", "Inference request latency, receipt to answer",
                                 ["protocol"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("edgederm_queue_wait_seconds", "Time an inference request waited for a worker",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predictions = Counter("edgederm_predictions", "Predictions made", registry=self.registry)
        self.reviews = Counter("edgederm_predictions_needing_review", "Predictions flagged needs_review",
                               registry=self.registry)
        self.review_rate = Gauge("edgederm_review_rate", "Share of predictions flagged needs_review so far",
                                 registry=self.registry)
        self.memory_peak = Gauge("edgederm_memory_peak_bytes", "Peak resident memory the runtime reported",
                                 registry=self.registry)
        depth = Gauge("edgederm_queue_depth", "Inference requests waiting for a worker", registry=self.registry)
        depth.set_function(queue_depth)
        running = Gauge("edgederm_requests_in_flight", "Inference requests being run", registry=self.registry)
        running.set_function(in_flight)
        self._lock = threading.Lock()
        self._counts = [0, 0]  # predictions, reviews: the gauge's ratio without reading counters back

    def observe_result(self, needs_review: bool, memory_peak_bytes: int | None) -> None:
        self.predictions.inc()
        if needs_review:
            self.reviews.inc()
        with self._lock:
            self._counts[0] += 1
            self._counts[1] += int(needs_review)
            self.review_rate.set(self._counts[1] / self._counts[0])
        if memory_peak_bytes:
            self.memory_peak.set(memory_peak_bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def log_access(**fields: Any) -> None:
    """One JSON line per request: time, protocol, endpoint, model, status, latency, sizes, peer."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(json.dumps({"time": round(time.time(), 3), **fields}, separators=(",", ":"), default=str))
