"""One served model: authorisation, the bounded request queue, prediction and metrics.

Transport-independent: the HTTP app and the gRPC servicer both call
``InferenceService``. Requests are checked (size, dimensions, datatypes) where
they arrive; decoding and prediction run on the queue's worker threads, so the
HTTP event loop and the gRPC threads only ever wait.

Back-pressure: at most ``workers`` requests run and ``queue_size`` wait; one more
is refused at once (HTTP 429, gRPC RESOURCE_EXHAUSTED) rather than left to time
out, so a client can back off. A request that waits or runs past ``timeout_s``
is answered with a timeout (504 / DEADLINE_EXCEEDED); if it had not started it
is dropped from the queue, if it had, its result is discarded.
"""
from __future__ import annotations

import hmac
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from edgederm.runtime.backends.remote import safe_model_name
from edgederm.runtime.bundle import Stage
from edgederm.runtime.errors import InputError

from . import protocol
from .metrics import Metrics
from .protocol import Limits, ProtocolError, Request, Tensor, predict_request

SERVER_NAME = "edgederm"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "parameters"]


def timeout_error(seconds: float) -> ProtocolError:
    return ProtocolError(f"the request did not finish within {seconds:g} s (queue wait + inference); "
                         "retry later, send a smaller image, or start the server with a longer --timeout",
                         504, "DEADLINE_EXCEEDED")


class RequestQueue:
    """A bounded FIFO served by worker threads; ``submit`` never blocks.

    Admission counts requests waiting or running against ``workers + capacity`` under
    one lock, and a request leaves the count before its answer is handed back: a
    closed-loop client that sends its next request the moment it gets an answer is
    never refused for a slot its own previous request still seemed to hold.
    """

    def __init__(self, workers: int, capacity: int) -> None:
        if workers < 1 or capacity < 0:
            raise InputError(f"workers={workers}, queue_size={capacity}; expected workers >= 1 and queue_size >= 0")
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._capacity = capacity
        self._limit = workers + capacity
        self._admitted = 0
        self._running = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"edgederm-worker-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Requests admitted and waiting for a worker."""
        return self._admitted - self._running

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._admitted >= self._limit:
                raise ProtocolError(
                    f"the server is busy: {len(self._threads)} request(s) running and {self._capacity} waiting, "
                    "the most it holds; retry after a short wait", 429, "RESOURCE_EXHAUSTED")
            self._admitted += 1
        self._queue.put((future, job))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, job = item
            if not future.set_running_or_notify_cancel():  # its client gave up while it waited
                with self._lock:
                    self._admitted -= 1
                continue
            with self._lock:
                self._running += 1
            try:
                outcome, failed = job(), False
            except BaseException as exc:  # handed to the waiting request, which answers with it
                outcome, failed = exc, True
            with self._lock:
                self._running -= 1
                self._admitted -= 1
            if failed:
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what is queued and running, then stop the workers; False if ``timeout`` ran out."""
        for _ in self._threads:
            self._queue.put(None)  # after every queued job: FIFO
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in self._threads)


@dataclass
class Job:
    """A queued request: the model it addressed and the future of its output tensors."""

    model: str
    future: Future[list[Tensor]]


class InferenceService:
    """A loaded model behind the KServe v2 protocol."""

    def __init__(self, model: Any, name: str | None = None, limits: Limits | None = None,
                 token: str | None = None) -> None:
        self.model = model
        self.limits = limits or Limits()
        self.name = safe_model_name(name or model.manifest.model.name or "model")
        self.task: str = model.task
        self.modalities: list[str] = list(model.modalities)
        self.class_names: list[str] = list(model.class_names)
        # Each stage graph is also a model, "<name>_<stage>", for remote backends that tile locally.
        self.stages: dict[str, Stage] = {f"{self.name}_{s.name}": s for s in model.manifest.stages}
        self._token = token.encode("utf-8") if token else None
        self.queue = RequestQueue(self.limits.workers, self.limits.queue_size)
        self.metrics = Metrics(lambda: self.queue.depth, lambda: self.queue.running)
        self.accepting = True

    # -- checks -------------------------------------------------------------------------
    def authorize(self, authorization: str | None) -> None:
        """Bearer token check in constant time; no token configured means loopback-only, no check."""
        if self._token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        # Compared even when the scheme is wrong, so the time taken does not tell which part failed.
        ok = hmac.compare_digest(given.strip().encode("utf-8"), self._token)
        if not ok or scheme.lower() != "bearer":
            raise ProtocolError("missing or wrong bearer token: send the header 'Authorization: Bearer <token>'",
                                401, "UNAUTHENTICATED")

    def check_model(self, name: str, version: str = "") -> Stage | None:
        """None for the pipeline model, the manifest's stage for a stage model; 404 otherwise."""
        if name != self.name and name not in self.stages:
            raise protocol.not_found(f"unknown model {name!r}; this server has {self.name!r} and its stages "
                                     f"{sorted(self.stages)}")
        if version not in ("", protocol.MODEL_VERSION):
            raise protocol.not_found(f"model {name!r} has no version {version!r}; it has version "
                                     f"{protocol.MODEL_VERSION!r}")
        return self.stages.get(name)

    @property
    def ready(self) -> bool:
        return self.accepting

    # -- descriptions -------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        from edgederm import __version__

        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        stage = self.check_model(name, version)
        if stage is not None:
            return protocol.stage_metadata(name, stage)
        return protocol.model_metadata(self.name, self.task, self.modalities)

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        stage = self.check_model(name, version)
        if stage is not None:
            return protocol.stage_config(name, stage, platform="edgederm")
        return protocol.model_config(self.name, self.task, self.modalities, self.class_names, self.limits)

    # -- inference ----------------------------------------------------------------------
    def start(self, name: str, version: str, tensors: list[Tensor], parameters: dict[str, Any],
              outputs: list[str] | None) -> Job:
        """Check a request and queue it; the Job's future holds the output tensors."""
        stage = self.check_model(name, version)
        if not self.accepting:
            raise ProtocolError("the server is shutting down; send the request to another instance or retry "
                                "after it restarts", 503, "UNAVAILABLE")
        enqueued = time.perf_counter()
        if stage is None:
            request = protocol.parse_request(tensors, parameters, outputs, self.modalities, self.task, self.limits)
            return Job(name, self.queue.submit(lambda: self._predict(request, enqueued)))
        feed = protocol.stage_feed(stage, tensors)
        backend = self.model.stages[stage.name]

        def run_stage() -> list[Tensor]:
            self.metrics.queue_wait.observe(time.perf_counter() - enqueued)
            return protocol.stage_tensors(stage, backend.run(feed), outputs)
        return Job(name, self.queue.submit(run_stage))

    def _predict(self, request: Request, enqueued: float) -> list[Tensor]:
        started = time.perf_counter()
        self.metrics.queue_wait.observe(started - enqueued)
        result = predict_request(self.model, request)
        result.timings = {"queue": (started - enqueued) * 1000, **result.timings}
        self.metrics.observe_result(result.needs_review, result.memory_peak_bytes)
        return protocol.result_tensors(result, self.task, request.outputs, request.mask_format)

    def close(self, timeout: float | None = None) -> bool:
        self.accepting = False
        return self.queue.close(timeout)
