"""Load test for a KServe v2 server: N closed-loop clients for a fixed time.

``python -m edgederm.serve.loadtest --bundle BUNDLE --image lesion.jpg --clients 8 --seconds 60``
serves BUNDLE on loopback in this process and drives it; ``--url http://HOST:PORT``
drives a server that is already running (``edgederm serve`` or Triton). Each client
sends one request, waits for the answer, and sends the next (plain ``http.client``
with keep-alive, the binary tensor extension: what a C or Java client does).

Reported: requests sent and answered (a request without an answer is lost), errors
by status, throughput, p50/p99 latency, and the server's resident memory after the
warm-up and at the end (from its ``process_resident_memory_bytes`` metric).
"""
from __future__ import annotations

import argparse
import http.client
import json
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


@dataclass
class LoadReport:
    clients: int
    seconds: float
    sent: int = 0
    answered: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    throughput_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_after_warmup_bytes: int | None = None
    rss_end_bytes: int | None = None

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    @property
    def rss_growth(self) -> float | None:
        if not self.rss_after_warmup_bytes or not self.rss_end_bytes:
            return None
        return self.rss_end_bytes / self.rss_after_warmup_bytes - 1.0

    def lines(self) -> list[str]:
        growth = self.rss_growth
        return [
            f"{self.clients} clients x {self.seconds:g} s: {self.sent} sent, {self.answered} answered, "
            f"{self.lost} lost, {self.ok} ok, errors {self.errors or 'none'}",
            f"throughput {self.throughput_per_s:.1f} requests/s, latency p50 {self.p50_ms:.1f} ms, "
            f"p99 {self.p99_ms:.1f} ms",
            "server RSS " + (f"{self.rss_after_warmup_bytes / 2**20:.1f} MiB after warm-up -> "
                             f"{self.rss_end_bytes / 2**20:.1f} MiB ({growth * 100:+.2f}%)"
                             if growth is not None and self.rss_after_warmup_bytes and self.rss_end_bytes
                             else "not reported by the server"),
        ]


def infer_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    """An inference request carrying ``image`` as the BYTES input ``dermoscopy`` (binary extension)."""
    header = json.dumps({"inputs": [{"name": "dermoscopy", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(image) + 4}}],
                         "parameters": {"binary_data_output": False}}).encode()
    body = header + struct.pack("<I", len(image)) + image
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


class Client:
    """One keep-alive HTTP connection; ``send`` returns (status, seconds)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                                     timeout=timeout)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def send(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, float]:
        start = time.perf_counter()
        self.connection.request("POST", path, body=body, headers={**headers, **self.auth})
        response = self.connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - start

    def close(self) -> None:
        self.connection.close()


def server_rss(url: str, token: str | None = None) -> int | None:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
        text = connection.getresponse().read().decode("utf-8", "replace")
    finally:
        connection.close()
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    return None


def run_clients(url: str, model: str, image: bytes, clients: int = 8, seconds: float = 60.0,
                warmup_s: float = 2.0, token: str | None = None) -> LoadReport:
    """Drive the server for ``warmup_s`` (not counted), then ``seconds`` (counted)."""
    path = f"/v2/models/{model}/infer"
    body, headers = infer_body(image)
    report = LoadReport(clients=clients, seconds=seconds)
    latencies: list[float] = []
    lock = threading.Lock()
    phase = {"counting": False}
    stop = threading.Event()

    def client_loop() -> None:
        client = Client(url, token)
        try:
            while not stop.is_set():
                counting = phase["counting"]
                try:
                    status: int | None
                    status, elapsed = client.send(path, body, headers)
                except (OSError, http.client.HTTPException):  # no answer: the request is lost
                    status, elapsed = None, 0.0
                    client.close()
                    client = Client(url, token)
                if not counting:
                    continue
                with lock:
                    report.sent += 1
                    if status is None:
                        continue
                    report.answered += 1
                    if status == 200:
                        report.ok += 1
                        latencies.append(elapsed)
                    else:
                        report.errors[str(status)] = report.errors.get(str(status), 0) + 1
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, name=f"load-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    report.rss_after_warmup_bytes = server_rss(url, token)
    phase["counting"] = True
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(120)
    elapsed = time.perf_counter() - start
    report.rss_end_bytes = server_rss(url, token)
    if latencies:
        ordered = sorted(latencies)
        report.p50_ms = ordered[len(ordered) // 2] * 1000
        report.p99_ms = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    report.throughput_per_s = report.ok / elapsed if elapsed > 0 else 0.0
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgederm.serve.loadtest", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--bundle", type=Path, help="serve this bundle on loopback in this process")
    target.add_argument("--url", help="drive a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name (with --url; default: the server's only model)")
    parser.add_argument("--image", type=Path, required=True, help="encoded image every request sends")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    image = args.image.read_bytes()
    server: Any = None
    if args.bundle is not None:
        from edgederm.runtime import load

        from .protocol import Limits
        from .server import Server

        server = Server(load(args.bundle), http_port=0, grpc_port=None,
                        limits=Limits(queue_size=max(args.clients, 1))).start()
        url, model = server.addresses()["http"], server.name
    else:
        url, model = args.url, args.model
        if model is None:
            raise SystemExit("--model is needed with --url")
    try:
        report = run_clients(url, model, image, clients=args.clients, seconds=args.seconds, warmup_s=args.warmup)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        print(json.dumps({**asdict(report), "lost": report.lost, "rss_growth": report.rss_growth}, indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if not report.errors and report.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
